"""Held-out gains of post-training: base vs SFT (chat) vs RL vs DPO on the RL tasks' held-out split.

    python benchmarks/rl_gain.py runs/demo [--tasks arithmetic] [--problems 200] [--samples 16]
    python benchmarks/rl_gain.py runs/demo --split dev --extra lr1e-4=runs/demo/rl_lr1e-4 --samples 0

For every model the run has (RUN, RUN/chat, RUN/rl, RUN/dpo) and every `--extra LABEL=DIR` (an
RL or DPO output directory made with --out), reports greedy pass@1 and, from `--samples`
completions at temperature 1, unbiased pass@k for k = 1, 2, 4, 8, 16 on the same problems.
`--split heldout` (default) is the test split: eval-only wordings and facts (see
spud.posttrain.rl_tasks); `--split dev` is drawn the same way with no question in common with it,
for choosing settings without tuning on the reported numbers. All models answer through the chat
template, so the base model is at a format disadvantage: its row shows what post-training added,
not its knowledge. `--why` sorts the greedy failures: a wrong answer whose every "a op b = c" step
is right (the model read the problem wrong), one with an arithmetic slip in a step, one with no
step written. `--by-wording` adds greedy pass@1 per question wording (the template id, without its
distractor), which shows whether a gain is spread over the eval-only wordings or sits in one.
Prints a table and writes JSON (default benchmarks/results/rl_gain.json).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from spud.posttrain.rl_eval import evaluate
from spud.posttrain.rl_tasks import load_tasks
from spud.posttrain.verifiers import equation_slips
from spud.runs import default_serving_model, has_model, load_model


def failures(outs: list) -> dict:
    """Shares of the problems answered wrongly, by why (from each greedy completion's steps)."""
    why = {"wrong_plan": 0, "wrong_arithmetic": 0, "wrong_no_step": 0}
    for (text,), right in outs:
        if not right:
            steps, slips = equation_slips(text)
            why["wrong_no_step" if not steps else "wrong_arithmetic" if slips else "wrong_plan"] += 1
    return {k: v / max(1, len(outs)) for k, v in why.items()}


def by_wording(problems: list, outs: list) -> dict:
    """Greedy pass@1 per question wording (Problem.wording, distractors not told apart); problems
    of a user file, which have no wording id, count as "-"."""
    hits: dict = {}
    for p, (_, right) in zip(problems, outs):
        w = p.wording or "-"
        n = hits.setdefault(w, [0, 0])
        n[0], n[1] = n[0] + bool(right), n[1] + 1
    return {w: {"pass@1": c / n, "n": n} for w, (c, n) in sorted(hits.items())}


def measure(label: str, run, kind: str, problems: list, split: str, samples: int, max_tokens: int = 64,
            why: bool = False, wording: bool = False) -> dict:
    """One model's row: greedy pass@1 and, from `samples` completions at temperature 1 (seed 1,
    the same draws for every model), unbiased pass@k; optionally the failures sorted and the
    per-wording greedy pass@1."""
    model, tok, _, ckpt = load_model(run, model=kind, device="cpu")
    t0 = time.perf_counter()
    outs: list = []
    greedy = evaluate(model, tok, problems, 1, 0.0, max_tokens, completions=outs)
    row = {"model": label, "checkpoint": str(ckpt), "split": split, "greedy_pass@1": greedy["pass@1"],
           "n": greedy["n"], "samples": samples}
    if why:
        row.update(failures(outs))
    if wording:
        row["by_wording"] = by_wording(problems, outs)
    if samples:
        sampled = evaluate(model, tok, problems, samples, 1.0, max_tokens, seed=1)
        row.update({f"sampled_{k}": v for k, v in sampled.items() if k.startswith("pass@")})
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--tasks", default="arithmetic")
    ap.add_argument("--split", choices=["heldout", "dev"], default="heldout")
    ap.add_argument("--problems", type=int, default=200)
    ap.add_argument("--samples", type=int, default=16, help="sampled completions per problem (0 = greedy only)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--models", default="base,chat,rl,dpo", help="models of RUN to evaluate, if it has them ('' = none)")
    ap.add_argument("--extra", action="append", default=[], metavar="LABEL=DIR",
                    help="also evaluate the model in DIR (an RL/DPO output made with --out)")
    ap.add_argument("--why", action="store_true", help="sort the greedy failures: wrong plan, arithmetic slip, no step")
    ap.add_argument("--by-wording", action="store_true", help="greedy pass@1 per question wording")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--out", default="benchmarks/results/rl_gain.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    _, problems, _ = load_tasks(args.tasks.split(","), 1, args.problems, 0, args.split)
    kinds = [k for k in args.models.split(",") if k]  # --models '' evaluates only the --extra ones
    todo = [(kind, args.run, kind) for kind in kinds if has_model(args.run, kind)]
    for spec in args.extra:
        label, _, path = spec.partition("=")
        todo.append((label, path, default_serving_model(path)))
    if not todo:
        raise SystemExit(f"rl_gain: nothing to measure: {args.run} has none of --models {args.models!r} "
                         "and no --extra LABEL=DIR was given")
    rows = []
    for label, run, kind in todo:
        rows.append(measure(label, run, kind, problems, args.split, args.samples, args.max_tokens,
                            args.why, args.by_wording))
        print(json.dumps(rows[-1]), flush=True)
    keys = ["greedy_pass@1"] + [k for k in rows[0] if k.startswith(("sampled_", "wrong_"))]
    print(f"\n{args.split} split, {rows[0]['n']} problems, {args.samples} samples at temperature 1 "
          f"(load {os.getloadavg()[0]:.1f})")
    print("| model | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
    for r in rows:
        print(f"| {r['model']} | " + " | ".join(f"{100 * r[k]:.1f} %" for k in keys) + " |")
    if args.by_wording:
        words = list(rows[0]["by_wording"])
        print("\ngreedy pass@1 by wording (problems)\n| model | " + " | ".join(
            f"{w} ({rows[0]['by_wording'][w]['n']})" for w in words) + " |\n|---|" + "---|" * len(words))
        for r in rows:
            print(f"| {r['model']} | " + " | ".join(f"{100 * r['by_wording'][w]['pass@1']:.1f} %" for w in words) + " |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"run": args.run, "tasks": args.tasks, "split": args.split,
                                          "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
