"""`spud rl`: on-policy reinforcement learning from verifiable rewards (GRPO family).

One step:
1. **Rollouts.** `rl.prompts_per_step` problems are drawn (a pure function of seed and step, so a
   resumed run draws the same ones) from the levels the curriculum allows, and `rl.group`
   completions of each are sampled through the serving engine's continuous batching — the same
   generation path as serve and eval. With dynamic sampling (DAPO), groups whose rewards are all
   equal are replaced by fresh ones; with `rl.drop_solved` a problem a whole group solved is not
   drawn again (spud.posttrain.rl_sampling); with `rl.carry_surplus` groups found beyond the
   quota lead the next step's batch (spud.posttrain.rl_carry).
2. **Rewards.** Each completion is judged by its problem's verifier (spud.posttrain.verifiers):
   1 if correct, plus `rl.format_weight` if the answer sits where it belongs, plus
   `rl.step_weight` (default 0) if it writes "a op b = c" steps and every one is right. A
   verifier that crashes or times out gives 0 and is counted (`verifier_errors`), never raised.
3. **Advantages.** Dr. GRPO (Liu et al. 2025): reward minus the group mean, *not* divided by the
   group's standard deviation (`rl.advantage: grpo` divides), because the division up-weights
   groups that are nearly all right or all wrong — noise for a small model. A group whose rewards
   are all equal has zero advantage and contributes no gradient. `rl.negative_weight` scales the
   negative advantages only (below 1: the update leans on the right answers).
4. **Update.** The clipped policy-gradient objective of PPO with DAPO's asymmetric "clip-higher"
   range [1 − clip_low, 1 + clip_high] (Yu et al. 2025), averaged over every completion token of
   the batch (token-level, so long answers are not down-weighted per token as in the original
   per-sequence mean), plus an optional k3 KL penalty to the starting model. With
   `rl.ppo_epochs: 1` the batch is used once and the ratio is 1 at the update, so this is the exact
   on-policy gradient; more epochs reuse rollouts and the clip then matters. AdamW at `rl.lr`
   after a linear warm-up, then `rl.schedule` (constant by default; spud.train.schedule.rl_lr).

The result, RUN/rl/, is a run directory of its own served with `--model rl` (with `rl.ema_decay`,
an average of the policy's weights: spud.posttrain.rl_average). Resume is exact (rollouts depend
only on seed, step and weights); Ctrl-C saves a checkpoint and exits 130.
"""

from __future__ import annotations

import io
import os
import shutil
import time
from pathlib import Path

import torch
from rich.console import Console

from spud.config import Config, _merge, parse_overrides, save_config, validate_config
from spud.errors import SpudError
from spud.model.registry import build_model
from spud.posttrain.rl_average import BestModel, WeightAverage, checkpoint_weights, frozen_copy, load_resumed
from spud.posttrain.rl_carry import fill_old_logprobs, restore_carry, sampling_logprobs
from spud.posttrain.rl_dist import NullLog, RLDist
from spud.posttrain.rl_eval import evaluate, generate_many, prompt_ids
from spud.posttrain.rl_logprobs import completion_batch, token_logprobs
from spud.posttrain.rl_sampling import SolvedPool, advantages, collect, level_cap, level_range, problem_stream, seed_of
from spud.posttrain.rl_tasks import Problem, load_tasks
from spud.posttrain.verifiers import steps_right, verify
from spud.runtime import set_threads
from spud.tokenizer import Tokenizer
from spud.train import checkpoint as ckpt_io
from spud.train.faults import graceful_stop
from spud.train.metrics import MetricsLog, truncate_after
from spud.train.schedule import rl_lr


class RLRun:
    def __init__(self, cfg: Config, out: Path, console, resume: bool):
        self.cfg, self.out, self.console = cfg, out, console
        r = cfg.rl
        self.dist = RLDist(cfg.train)  # a single process unless launched by torchrun (rl_dist)
        main = self.dist.is_main
        if main:
            out.mkdir(parents=True, exist_ok=True)
            src = Path(r.base_checkpoint).parent.parent  # the run dir whose checkpoints/ held it
            for name in ("tokenizer.json", "tokenizer_config.json"):
                if (src / name).is_file():
                    shutil.copyfile(src / name, out / name)
        self.dist.barrier()
        self.tok = Tokenizer.load(out / "tokenizer.json")
        # 0 = all cores, shared among the ranks on this machine under torchrun
        set_threads(self.dist.threads(cfg.train.threads))
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg.model)
        ckpt_io.load_weights(Path(r.base_checkpoint), self.model, "cpu")
        self.ref = None
        if r.kl > 0:
            self.ref = frozen_copy(self.model, cfg.model).eval()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=r.lr, betas=(0.9, 0.99), weight_decay=0.0)
        self.avg = WeightAverage(self.model, cfg.model, r.ema_decay) if r.ema_decay > 0 else None
        self.served = self.avg.model if self.avg is not None else self.model  # what evaluations score
        self.best = BestModel(self.served, cfg.model) if r.keep_best else None
        if r.keep_best and r.eval_split == "heldout":
            console.print("[yellow]rl.keep_best chooses the model on the held-out (test) split, so the chosen "
                          "model's held-out scores are biased upward; choose on rl.eval_split=dev")
        train, heldout, self.task_summary = load_tasks(r.tasks, r.train_problems, r.heldout_problems, cfg.seed,
                                                       r.eval_split)
        # A prompt that leaves no room for the answer is skipped and counted, never cut: a question
        # missing its beginning would teach the model to answer a different question.
        limit = cfg.model.max_seq_len - r.max_tokens
        fits = lambda p: len(self.tok.render_chat(p.messages, add_generation_prompt=True)[0]) <= limit  # noqa: E731
        self.train_set = [p for p in train if fits(p)]
        self.heldout = [p for p in heldout if fits(p)]
        too_long = len(train) - len(self.train_set) + len(heldout) - len(self.heldout)
        self.task_summary.append({"too_long_skipped": too_long})
        if too_long:
            console.print(f"[yellow]{too_long} problems are longer than the {limit} prompt tokens the "
                          f"context leaves after rl.max_tokens={r.max_tokens}: skipped")
        if not self.train_set:
            raise SpudError(f"no RL training problem fits the model's context ({limit} prompt tokens "
                            f"after rl.max_tokens={r.max_tokens})")
        self.levels = level_range(self.train_set, r.min_level, r.max_level)
        self.solved, self.step = SolvedPool(self.train_set, r.drop_solved), 0
        self.carry, self.survival = [], None  # rl.carry_surplus (spud.posttrain.rl_carry)
        latest = ckpt_io.latest_checkpoint(out) if resume else None
        if latest is not None:
            load_resumed(latest, state := ckpt_io.read_state(latest), self.model, self.avg, self.best)
            self.opt.load_state_dict(torch.load(latest / "optimizer.pt", weights_only=True))
            self.step = int(state["step"])
            self.solved.restore(state.get("rl_solved", []))
            self.carry = restore_carry(state.get("rl_carry"), r.carry_surplus, console)
            self.survival = state.get("rl_survival")
            if main:
                truncate_after(out / "metrics.jsonl", self.step)
            console.print(f"resuming RL from step {self.step} ({latest})")
        elif resume:
            console.print(f"[yellow]no checkpoint in {out}: starting RL from {r.base_checkpoint}")
        self.dist.barrier()  # every rank has read the checkpoint before rank 0 writes anything
        if main:
            save_config(cfg, out / "config.yaml")
        self.log = MetricsLog(out / "metrics.jsonl") if main else NullLog()
        self.model.train()

    # ----------------------------------------------------------------------------- one step
    def rollout(self) -> tuple[list, list[float], dict]:
        r = self.cfg.rl
        lo, hi = self.levels
        cap = level_cap(lo, hi, r.curriculum_steps, self.step)
        draw = problem_stream(self.train_set, lo, cap, self.cfg.seed, self.step, self.solved.skip())
        limit = self.model.cfg.max_seq_len - r.max_tokens

        def sample(problems: list[Problem], round_: int):
            prompts = [prompt_ids(self.tok, p, limit) for p in problems for _ in range(r.group)]
            seeds = [seed_of(self.cfg.seed, "rl-sample", self.step, round_, i) for i in range(len(prompts))]

            def sample_and_verify(idx: list[int]) -> list[tuple[list[int], float, bool, bool]]:
                outs = generate_many(self.model, self.tok, [prompts[i] for i in idx], r.max_tokens,
                                     r.temperature, [seeds[i] for i in idx])
                done = []
                for i, (ids, text) in zip(idx, outs):
                    p = problems[i // r.group]
                    v = verify(p.verifier, text, p.reference, p.tests, r.verifier_timeout_s)
                    reward = v.correct + r.format_weight * v.formatted + r.step_weight * steps_right(text)
                    done.append((ids, float(reward), bool(v.correct), v.error is not None))
                return done

            res = self.dist.map(sample_and_verify, range(len(prompts)))  # split across ranks, if any
            rows = [(prompts[i], ids) for i, (ids, _, _, _) in enumerate(res)]
            return rows, [x[1] for x in res], [x[2] for x in res], sum(x[3] for x in res)

        got = collect(draw, sample, r.prompts_per_step, r.group, r.dynamic_sampling, r.max_sample_rounds,
                      self.carry, r.carry_surplus, self.survival)
        self.solved.add(got.solved)
        # the surplus's log-probs under the policy that sampled it, before this step's update
        fill_old_logprobs(self.model, got.surplus, self.tok.pad_id, r.micro_batch_size)
        self.carry = got.surplus
        if got.stats["survival"] is not None:
            self.survival = got.stats["survival"]
        return (got.rows, got.rewards, {**got.stats, "level_cap": cap, "solved_problems": len(self.solved.ids)},
                got.old_logprobs)

    def update(self, rows, adv: list[float], sampled_logprobs: list | None = None) -> dict:
        r = self.cfg.rl
        lr = rl_lr(r, self.step)
        keep = [i for i, a in enumerate(adv) if a != 0.0 and rows[i][1]]
        if not keep:
            return {"skipped": True, "entropy": None, "kl": 0.0, "clip_fraction": 0.0, "loss": 0.0, "lr": lr,
                    "policy_drift": 0.0}
        pad = self.tok.pad_id
        chunks = [keep[i:i + r.micro_batch_size] for i in range(0, len(keep), r.micro_batch_size)]
        # Every rank normalises by the whole batch's token count and runs its share of the
        # micro-batches; the ranks' gradients summed are then the single-process gradient.
        n_tokens = sum(len(rows[i][1]) for i in keep)
        chunks = self.dist.deal(chunks)
        batches = []
        # With one pass the sampling policy is the current one: its log-probs are the live ones
        # detached (ratio exactly 1), so the extra forward that reuse of rollouts needs is skipped.
        # Rows carried from the last step (rl.carry_surplus) bring their sampling policy's log-probs.
        reuse = r.ppo_epochs > 1
        with torch.no_grad():
            for ch in chunks:
                x, y = completion_batch([rows[i] for i in ch], pad)
                stored = [sampled_logprobs[i] if sampled_logprobs else None for i in ch]
                old = sampling_logprobs(token_logprobs(self.model, x, y, share_prompts=True)[0], y, stored) \
                    if reuse else stored
                ref = token_logprobs(self.ref, x, y, share_prompts=True)[0] if self.ref is not None else None
                batches.append((x, y, torch.tensor([adv[i] for i in ch]).unsqueeze(1), old, ref))
        for g in self.opt.param_groups:
            g["lr"] = lr
        ent = kl_sum = clipped = loss_sum = drift = 0.0
        for _ in range(r.ppo_epochs):
            self.opt.zero_grad(set_to_none=True)
            for x, y, a, old, ref in batches:
                mask = (y >= 0).float()
                logp, entropy = token_logprobs(self.model, x, y, entropy_grad=r.entropy_weight != 0,
                                               share_prompts=True)
                log_ratio = logp - (old if reuse else sampling_logprobs(logp, y, old))
                ratio = torch.exp(log_ratio)
                surr = torch.minimum(ratio * a, ratio.clamp(1 - r.clip_low, 1 + r.clip_high) * a)
                per_token = -surr - r.entropy_weight * entropy
                if ref is not None:
                    d = ref - logp
                    kl = (torch.exp(d) - d - 1) * mask  # k3: unbiased, always >= 0
                    per_token = per_token + r.kl * kl
                    kl_sum += float(kl.sum())
                loss = (per_token * mask).sum() / n_tokens
                loss.backward()
                loss_sum += float(loss.detach())
                ent += float(entropy.detach().sum())
                clipped += float((((ratio < 1 - r.clip_low) | (ratio > 1 + r.clip_high)).float() * mask).sum())
                drift += float((log_ratio.detach().abs() * mask).sum())
            self.dist.sum_grads(list(self.model.parameters()))
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), r.grad_clip)
            self.opt.step()
        ent, kl_sum, clipped, loss_sum, drift = self.dist.all_sum([ent, kl_sum, clipped, loss_sum, drift])
        total = n_tokens * r.ppo_epochs
        return {"skipped": False, "entropy": ent / total, "kl": kl_sum / total,
                "clip_fraction": clipped / total, "loss": loss_sum / r.ppo_epochs, "lr": lr,
                # mean |log π_now − log π_sampled| per token: 0 for fresh rollouts used once
                "policy_drift": drift / total,
                "sequences": len(keep)}

    def save(self) -> Path:
        state = {"config": self.cfg.model_dump(mode="json"), "tokenizer_sha256": self.tok.sha256(),
                 "loader": None, "tokens_seen": 0, "val": None, "rl_solved": sorted(self.solved.ids),
                 "rl_carry": [g.to_json() for g in self.carry], "rl_survival": self.survival,
                 **({"rl_best": self.best.state()} if self.best is not None else {})}
        path = None
        if self.dist.is_main:  # the weights are equal on every rank
            model, extra = checkpoint_weights(self.model, self.avg, self.best)
            path = ckpt_io.save_checkpoint(self.out, self.step, model, self.opt, state, None,
                                           self.cfg.rl.keep_checkpoints, extra)
        self.dist.barrier()
        return path

    def heldout_pass1(self) -> dict:
        """The periodic evaluation, logged; with rl.keep_best it also offers the model to the selection."""
        r = self.cfg.rl
        ev = evaluate(self.served, self.tok, self.heldout, r.eval_samples, 0.0 if r.eval_samples == 1 else
                      r.temperature, r.max_tokens, self.cfg.seed, r.verifier_timeout_s, split_map=self.dist.map)
        if self.best is not None and "pass@1" in ev:
            self.best.offer(self.step, ev["pass@1"], self.served)
            ev["best_step"] = self.best.step
        self.log.write("rl_eval", self.step, split=r.eval_split, **ev)
        return ev

    def run(self) -> dict:
        r = self.cfg.rl
        start_eval = None
        if self.step == 0:
            start_eval = self.heldout_pass1()
            self.console.print(f"{r.eval_split} pass@1 before RL: {start_eval.get('pass@1', float('nan')):.3f} "
                               f"({start_eval['n']} problems)")
        interrupted = False
        with graceful_stop() as stop:
            while self.step < r.steps:
                t0 = time.perf_counter()
                rows, rewards, stats, sampled_logprobs = self.rollout()
                t1 = time.perf_counter()
                upd = self.update(rows, advantages(rewards, r.group, r.advantage, r.negative_weight),
                                  sampled_logprobs)
                if self.avg is not None:
                    self.avg.update()
                t2 = time.perf_counter()
                self.step += 1
                rec = self.log.write("rl", self.step, **stats, **upd, rollout_s=round(t1 - t0, 3),
                                     update_s=round(t2 - t1, 3))
                self.console.print(
                    f"rl step {self.step}/{r.steps} reward {rec['reward']:.3f} acc {rec['accuracy']:.3f} "
                    f"len {rec['response_length']:.1f} "
                    + (f"ent {upd['entropy']:.3f} " if upd["entropy"] is not None else "(no signal) ")
                    + f"groups {rec['groups_kept']}/{rec['groups_sampled']} "
                    + f"rollout {t1 - t0:.1f}s update {t2 - t1:.1f}s")
                if self.step % r.eval_every == 0 or self.step == r.steps:
                    ev = self.heldout_pass1()
                    self.console.print(f"  {r.eval_split} pass@1 {ev.get('pass@1', float('nan')):.3f}")
                stopping = self.dist.any_true(stop["stop"])  # one rank's Ctrl-C stops them all here
                if self.step % r.checkpoint_every == 0 or self.step == r.steps or stopping:
                    self.save()
                if stopping:
                    interrupted = True
                    self.log.write("event", self.step, event="interrupt")
                    break
        self.log.close()
        return {"steps": self.step, "interrupted": interrupted, "out": str(self.out),
                "start_eval": start_eval, "tasks": self.task_summary,
                **({"best": self.best.state()} if self.best is not None else {})}


def rl_config(run: str | Path, source: str, tasks: list[str] | None, out: Path,
              overrides: list[str], resume: bool) -> Config:
    """The RL run's config: the starting checkpoint's config, the saved `rl:` section when resuming,
    then overrides and --tasks; rl.base_run / base_checkpoint record where it started."""
    import yaml  # noqa: PLC0415

    from spud.runs import choose_model  # noqa: PLC0415

    saved = out / "config.yaml"
    saved_tree = None
    if resume and saved.is_file():
        saved_tree = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
    saved_rl = (saved_tree or {}).get("rl")
    if saved_rl and saved_rl.get("base_checkpoint"):
        base_ckpt = Path(saved_rl["base_checkpoint"])
        source = saved_rl.get("source", source)
        # the run's own config: its seed and train.* overrides (threads, parallel) too, which a
        # resume needs to draw and compute exactly what the uninterrupted run would have
        tree = saved_tree
    else:
        if source == "chat":
            from spud.runs import has_model  # noqa: PLC0415

            if not has_model(run, "chat"):
                raise SpudError(f"{run} has no chat model to start RL from; run `spud sft {run}` first, "
                                "or start from the base model with --from base")
        base_ckpt = choose_model(run, source).checkpoint
        tree = ckpt_io.read_state(base_ckpt)["config"]
        tree["dpo"] = {}  # the newest stage names the model (spud.runs._model_kind)
    if overrides:
        tree = _merge(tree, parse_overrides(overrides), "")
    tree.setdefault("rl", {})
    if tasks:
        tree["rl"]["tasks"] = list(tasks)
    tree["rl"].update(source=source, base_run=str(Path(run).resolve()),
                      base_checkpoint=str(base_ckpt.resolve()))
    cfg = validate_config(tree, f"spud rl {run}")
    if cfg.rl.max_tokens >= cfg.model.max_seq_len:
        raise SpudError(f"rl.max_tokens={cfg.rl.max_tokens} leaves no room for a prompt in the model's "
                        f"{cfg.model.max_seq_len}-token context")
    return cfg


def rl_cmd(run: str, source: str = "chat", tasks: list[str] | None = None, out: str | None = None,
           overrides: list[str] | None = None, resume: bool = False, console=None) -> dict:
    """`spud rl RUN [--from chat|base] [--tasks arithmetic,...] [--out DIR] [rl.key=value ...]`."""
    from spud.ui import make_console  # noqa: PLC0415

    console = console or make_console()
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 talks (rl_dist)
        console = Console(file=io.StringIO())
    out_dir = Path(out) if out else Path(run) / "rl"
    cfg = rl_config(run, source, tasks, out_dir, overrides or [], resume)
    runner = RLRun(cfg, out_dir, console, resume)
    try:
        return _run_and_report(runner, cfg, run, out_dir, console)
    finally:
        runner.dist.close()


def _run_and_report(runner: RLRun, cfg: Config, run: str, out_dir: Path, console) -> dict:
    console.print(f"rl: {len(runner.train_set):,} train / {len(runner.heldout):,} {cfg.rl.eval_split} problems from "
                  f"{', '.join(cfg.rl.tasks)} · {cfg.rl.prompts_per_step}×{cfg.rl.group} rollouts/step · "
                  f"from {cfg.rl.base_checkpoint}")
    summary = runner.run()
    if (best := summary.get("best")) and best["step"] is not None:
        console.print(f"handing on the model of step {best['step']}: the best {cfg.rl.eval_split} pass@1 of the "
                      f"run's evaluations ({best['score']:.3f})")
    console.print(f"RL model: {out_dir} (serve it with: spud serve {run} --model rl)")
    return summary
