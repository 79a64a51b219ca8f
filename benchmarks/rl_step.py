"""One RL step's two halves, each against its earlier forms, alternating in the same run.

- **Rollouts**: `--prompts` problems × `--group` sampled completions through
  spud.serve.batch.complete_many (the path `spud rl` samples with), five ways, each older
  form keeping every older part: `dedup` (the default: prompts that share a next chunk length
  are prefilled in one forward, each distinct prompt computed once and its copies' slots given
  its keys and values; the sampler takes no argmax over the vocabulary when no row needs one;
  each completion's text is decoded once at the end), `streamed` (the text decoded token by
  token as a streaming client needs it, `incremental_text` forced on), `argmax` (the sampler
  before that: two argmaxes a step, `argmax_each_step_sample_rows`),
  `shared` (one forward, every copy computed: the engine before the dedup, emulated by a
  prefill key that tells every row apart) and `alone` (one forward per prompt: the engine
  before that, emulated by a `_prefill_rows` that returns the row alone). The completions are
  checked equal.
- **Update**: forward + backward of spud.posttrain.rl_logprobs.token_logprobs on those
  rollouts, three ways: `share` (the default: each distinct prompt through the trunk once, the
  LM head on the completion positions only), `completion` (every row whole through the trunk,
  the head on the completion positions: share_prompts=False) and `all` (the head on every
  position, the earliest form, here as `all_positions_logprobs`). The log-probs are checked
  equal.

On the demo's chat model and the built-in arithmetic task when RUN has one, else on a random
model of the demo's shape with random prompts. Prints a table and writes JSON.

    python benchmarks/rl_step.py [RUN] [--prompts 4] [--group 8] [--rounds 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from spud.posttrain.rl_eval import generate_many, prompt_ids
from spud.posttrain.rl_logprobs import completion_batch, token_logprobs
from spud.serve import engine_forward, engine_seq
from spud.serve.detok import Detokenizer
from spud.serve.engine_sampling import filter_rows


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", nargs="?", default="runs/demo", help="a run with a chat model (else a random model)")
    p.add_argument("--prompts", type=int, default=4, help="problems per rollout (a DDP rank's share of 8)")
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 = one DDP rank's share)")
    p.add_argument("--out", default="benchmarks/results/rl_step.json")
    return p.parse_args(argv)


def load(run: Path, n: int, max_tokens: int):
    """(model, tokenizer, prompts, source): the chat model and arithmetic problems, or stand-ins."""
    from spud.config import ModelConfig, TokenizerConfig  # noqa: PLC0415
    from spud.model.registry import build_model  # noqa: PLC0415
    from spud.runs import has_model, load_model  # noqa: PLC0415
    from spud.tokenizer import train_tokenizer  # noqa: PLC0415

    if (run / "tokenizer.json").is_file() and has_model(run, "chat"):
        from spud.posttrain.rl_tasks import load_tasks  # noqa: PLC0415

        model, tok, cfg, _ = load_model(run, model="chat", device="cpu")
        train, _, _ = load_tasks(["arithmetic"], 4000, 0, 1337, "dev")
        limit = cfg.model.max_seq_len - max_tokens
        return model, tok, [prompt_ids(tok, p, limit) for p in train[:n]], f"{run} chat model, arithmetic"
    tok = train_tokenizer(iter(["Tom has 12 apples and gets 7 more. " * 4] * 50),
                          TokenizerConfig(vocab_size=300, min_frequency=1))
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="nano", vocab_size=tok.vocab_size, max_seq_len=256))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, tok.vocab_size, (int(L),), generator=g).tolist()
               for L in torch.randint(40, 80, (n,), generator=g)]
    return model, tok, prompts, "random nano model, random prompts"


def all_positions_logprobs(model, seqs: torch.Tensor, targets: torch.Tensor):
    """token_logprobs before it cut the head to the completion positions."""
    logp = torch.log_softmax(model(seqs).float(), dim=-1)
    mask = targets >= 0
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    d = logp.detach()
    return picked, -(d.exp() * d).sum(-1) * mask


def argmax_each_step_sample_rows(logits: torch.Tensor, bp, generators) -> torch.Tensor:
    """engine_sampling.sample_rows before it skipped the argmaxes no row needs."""
    greedy_ids = logits.argmax(-1)
    if bp.all_greedy:
        return greedy_ids
    probs = filter_rows(logits, bp).softmax(-1)
    u = torch.tensor([float(torch.rand((), generator=g)) if g is not None else 0.0 for g in generators],
                     dtype=probs.dtype, device=probs.device)
    cdf = probs.cumsum(-1)
    idx = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(1).clamp(max=probs.shape[-1] - 1)
    bad = probs.gather(1, idx[:, None]).squeeze(1) <= 0
    idx = torch.where(bad, probs.argmax(-1), idx)
    return torch.where(bp.temperature > 0, idx, greedy_ids)


class StreamedDetokenizer(Detokenizer):
    """The detokenizer as a streaming request has it: text decoded at every token."""

    def __init__(self, decode, stop=(), incremental=True):
        super().__init__(decode, stop, True)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok, distinct, source = load(Path(args.run), args.prompts, args.max_tokens)
    prompts = [p for p in distinct for _ in range(args.group)]
    seeds = list(range(len(prompts)))
    real_rows, real_key = engine_forward.ForwardSteps._prefill_rows, engine_forward._prefill_key
    real_sample, old_sample = engine_forward.sample_rows, argmax_each_step_sample_rows
    streamed = StreamedDetokenizer
    rollouts = {
        "dedup": (real_rows, real_key, real_sample, Detokenizer),
        "streamed": (real_rows, real_key, real_sample, streamed),
        "argmax": (real_rows, real_key, old_sample, streamed),
        "shared": (real_rows, lambda s: (id(s),), old_sample, streamed),  # every row its own key: no copies found
        "alone": (lambda self, s, n, b: [s], real_key, old_sample, streamed),
    }
    updates = {
        "share": lambda m, x, y: token_logprobs(m, x, y, share_prompts=True),
        "completion": lambda m, x, y: token_logprobs(m, x, y),
        "all": all_positions_logprobs,
    }

    def rollout(form: str):
        (engine_forward.ForwardSteps._prefill_rows, engine_forward._prefill_key,
         engine_forward.sample_rows, engine_seq.Detokenizer) = rollouts[form]
        try:
            t = time.perf_counter()
            outs = generate_many(model, tok, prompts, args.max_tokens, 1.0, seeds)
            return time.perf_counter() - t, outs
        finally:
            (engine_forward.ForwardSteps._prefill_rows, engine_forward._prefill_key,
             engine_forward.sample_rows, engine_seq.Detokenizer) = real_rows, real_key, real_sample, Detokenizer

    def update(form: str, x, y):
        model.zero_grad(set_to_none=True)
        t = time.perf_counter()
        lp, _ = updates[form](model, x, y)
        (-lp.sum() / (y >= 0).sum()).backward()
        return time.perf_counter() - t, lp.detach()

    times = {f"rollout_{k}": [] for k in rollouts} | {f"update_{k}": [] for k in updates}
    x = y = None
    for r in range(args.rounds + 1):  # round 0 warms up and is not counted
        outs = {}
        for form in (list(rollouts) if r % 2 == 0 else list(rollouts)[::-1]):
            dt, outs[form] = rollout(form)
            if r:
                times[f"rollout_{form}"].append(dt)
        if any(outs[f] != outs["dedup"] for f in outs):
            raise SystemExit("rollouts differ between the prefill forms")
        x, y = completion_batch([(p, ids) for p, (ids, _) in zip(prompts, outs["dedup"])], tok.pad_id)
        model.train()
        got = {}
        for form in (list(updates) if r % 2 == 0 else list(updates)[::-1]):
            dt, got[form] = update(form, x, y)
            if r:
                times[f"update_{form}"].append(dt)
        if not all(torch.allclose(got["all"], got[f], atol=1e-5) for f in updates):
            raise SystemExit("token log-probs differ between the update forms")
    med = {k: statistics.median(v) for k, v in times.items()}
    completion_share = float((y >= 0).sum()) / float(y.numel())
    res = {"source": source, "prompts": args.prompts, "group": args.group, "threads": args.threads,
           "rounds": args.rounds, "rows": len(prompts), "padded_positions": int(y.numel()),
           "completion_share": round(completion_share, 3), "median_s": {k: round(v, 4) for k, v in med.items()},
           "speedup": {k: round(med[k] / med["rollout_dedup" if k.startswith("rollout") else "update_share"], 2)
                       for k in med}, "times_s": times}
    print(f"{source}: {args.prompts} prompts × {args.group}, {args.threads} thread(s), median of {args.rounds} rounds")
    print(f"{'form':<20} {'s':>8} {'÷ default':>10}")
    what = {"rollout_dedup": "each distinct prompt prefilled once, text decoded once (default)",
            "rollout_streamed": "the same, the text decoded at every token",
            "rollout_argmax": "the same, the sampler taking two argmaxes a step",
            "rollout_shared": "one prefill forward, every copy computed (and the argmaxes)",
            "rollout_alone": "one prefill forward per prompt (and the argmaxes)",
            "update_share": "each distinct prompt through the trunk once (default)",
            "update_completion": "every row whole, head on completion positions",
            "update_all": f"every row whole, head on every position ({completion_share:.0%} are completion)"}
    for k, v in med.items():
        print(f"{k:<20} {v:>8.3f} {res['speedup'][k]:>10.2f}   {what[k]}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    return res


if __name__ == "__main__":
    main()
