"""Held-out gains of post-training: base vs SFT (chat) vs RL vs DPO on the RL tasks' held-out split.

    python benchmarks/rl_gain.py runs/demo [--tasks arithmetic] [--problems 200] [--samples 16]

For every model the run has (RUN, RUN/chat, RUN/rl, RUN/dpo), reports greedy pass@1 and, from
`--samples` completions at temperature 1, unbiased pass@k for k = 1, 2, 4, 8, 16 on the same
held-out problems (eval-only wordings and facts: see spud.posttrain.rl_tasks). All models answer
through the chat template, so the base model is at a format disadvantage: its row shows what
post-training added, not its knowledge. Prints a table and writes benchmarks/results/rl_gain.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from spud.posttrain.rl import evaluate
from spud.posttrain.rl_tasks import load_tasks
from spud.runs import has_model, load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--tasks", default="arithmetic")
    ap.add_argument("--problems", type=int, default=200)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--out", default="benchmarks/results/rl_gain.json")
    args = ap.parse_args()
    _, heldout, _ = load_tasks(args.tasks.split(","), 1, args.problems, 0)
    rows = []
    for kind in ("base", "chat", "rl", "dpo"):
        if not has_model(args.run, kind):
            continue
        model, tok, _, ckpt = load_model(args.run, model=kind, device="cpu")
        t0 = time.perf_counter()
        greedy = evaluate(model, tok, heldout, 1, 0.0, args.max_tokens)
        sampled = evaluate(model, tok, heldout, args.samples, 1.0, args.max_tokens, seed=1)
        rows.append({"model": kind, "checkpoint": str(ckpt), "greedy_pass@1": greedy["pass@1"],
                     **{f"sampled_{k}": v for k, v in sampled.items() if k.startswith("pass@")},
                     "n": greedy["n"], "samples": args.samples, "seconds": round(time.perf_counter() - t0, 1)})
        print(json.dumps(rows[-1]))
    keys = ["greedy_pass@1"] + [k for k in rows[0] if k.startswith("sampled_")]
    print("\n| model | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
    for r in rows:
        print(f"| {r['model']} | " + " | ".join(f"{100 * r[k]:.1f} %" for k in keys) + " |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"run": args.run, "tasks": args.tasks, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
