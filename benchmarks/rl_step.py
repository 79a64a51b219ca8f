"""One RL step's two halves, each against its earlier form, alternating in the same run.

- **Rollouts**: `--prompts` problems × `--group` sampled completions through
  spud.serve.batch.complete_many (the path `spud rl` samples with), with prompts that share a
  next chunk length prefilled in one forward (Engine._prefill_rows, the default) against one
  forward per prompt (the engine before it, emulated by a `_prefill_rows` that returns the row
  alone). The completions are checked equal.
- **Update**: spud.posttrain.rl.token_logprobs forward + backward on those rollouts, the LM head
  on the completion positions only (the default) against the head on every position (the
  earlier form, here as `all_positions_logprobs`). The log-probs are checked equal.

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

from spud.posttrain.rl import _batch, generate_many, prompt_ids, token_logprobs
from spud.serve import engine_forward


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


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok, distinct, source = load(Path(args.run), args.prompts, args.max_tokens)
    prompts = [p for p in distinct for _ in range(args.group)]
    seeds = list(range(len(prompts)))
    shared_rows = engine_forward.ForwardSteps._prefill_rows

    def rollout(shared: bool):
        engine_forward.ForwardSteps._prefill_rows = shared_rows if shared else (lambda self, s, n, b: [s])
        try:
            t = time.perf_counter()
            outs = generate_many(model, tok, prompts, args.max_tokens, 1.0, seeds)
            return time.perf_counter() - t, outs
        finally:
            engine_forward.ForwardSteps._prefill_rows = shared_rows

    def update(fn, x, y):
        model.zero_grad(set_to_none=True)
        t = time.perf_counter()
        lp, _ = fn(model, x, y)
        (-lp.sum() / (y >= 0).sum()).backward()
        return time.perf_counter() - t, lp.detach()

    times = {k: [] for k in ("rollout_shared", "rollout_alone", "update_completion", "update_all")}
    x = y = None
    for r in range(args.rounds + 1):  # round 0 warms up and is not counted
        order = (True, False) if r % 2 == 0 else (False, True)
        outs = {}
        for shared in order:
            dt, outs[shared] = rollout(shared)
            if r:
                times["rollout_shared" if shared else "rollout_alone"].append(dt)
        if outs[True] != outs[False]:
            raise SystemExit("rollouts differ between shared and one-row prefill")
        x, y = _batch([(p, ids) for p, (ids, _) in zip(prompts, outs[True])], tok.pad_id)
        model.train()
        got = {}
        for fn in ((token_logprobs, all_positions_logprobs) if r % 2 == 0 else (all_positions_logprobs, token_logprobs)):
            dt, got[fn] = update(fn, x, y)
            if r:
                times["update_completion" if fn is token_logprobs else "update_all"].append(dt)
        if not torch.allclose(got[token_logprobs], got[all_positions_logprobs], atol=1e-5):
            raise SystemExit("token log-probs differ between the two forms")
    med = {k: statistics.median(v) for k, v in times.items()}
    completion_share = float((y >= 0).sum()) / float(y.numel())
    res = {"source": source, "prompts": args.prompts, "group": args.group, "threads": args.threads,
           "rounds": args.rounds, "rows": len(prompts), "padded_positions": int(y.numel()),
           "completion_share": round(completion_share, 3), "median_s": {k: round(v, 4) for k, v in med.items()},
           "rollout_speedup": round(med["rollout_alone"] / med["rollout_shared"], 2),
           "update_speedup": round(med["update_all"] / med["update_completion"], 2), "times_s": times}
    print(f"{source}: {args.prompts} prompts × {args.group}, {args.threads} thread(s), median of {args.rounds} rounds")
    print(f"{'half':<10} {'new (s)':>9} {'old (s)':>9} {'old / new':>10}")
    print(f"{'rollout':<10} {med['rollout_shared']:>9.3f} {med['rollout_alone']:>9.3f} {res['rollout_speedup']:>10.2f}"
          "   shared prefill forward vs one per prompt")
    print(f"{'update':<10} {med['update_completion']:>9.3f} {med['update_all']:>9.3f} {res['update_speedup']:>10.2f}"
          f"   head on completion tokens ({completion_share:.0%} of positions) vs all")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    return res


if __name__ == "__main__":
    main()
