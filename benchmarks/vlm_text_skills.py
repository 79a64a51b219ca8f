"""Does adding vision cost the chat model its text skills? The demo's held-out chat eval
(spud.posttrain.chat_eval: exact match on held-out arithmetic and word problems, greedy, through
the serving engine) for RUN's chat model and its vision model (`spud vlm RUN`), side by side.

    python benchmarks/vlm_text_skills.py RUN [--n 100] [--out benchmarks/results/vlm_text_skills.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from spud.posttrain.chat_eval import SPLITS, eval_items, split_accuracy
from spud.runs import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--n", type=int, default=100, help="questions per split")
    ap.add_argument("--splits", default="operands,templates,three_digit,multi_step")
    ap.add_argument("--models", default="chat,vlm", help="which models of RUN to evaluate")
    ap.add_argument("--out", default="benchmarks/results/vlm_text_skills.json")
    args = ap.parse_args()
    splits = [s for s in args.splits.split(",") if s]
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        ap.error(f"unknown splits {unknown}; choose from {', '.join(SPLITS)}")
    items = [it for s in splits for it in eval_items(s, args.n)]
    result: dict = {"run": args.run, "n": args.n, "models": {}}
    kinds = [k for k in args.models.split(",") if k]
    for kind in kinds:
        model, tok, _, ckpt = load_model(args.run, model=kind, device="cpu")
        t0 = time.time()
        acc = split_accuracy(model, tok, items, chat=True)
        result["models"][kind] = {"checkpoint": str(ckpt), "seconds": round(time.time() - t0, 1),
                                  "splits": {s: acc[s]["accuracy"] for s in splits}}
    print(f"exact match, {args.n} held-out questions per split (greedy, chat template)")
    print(f"  {'split':<13}" + "".join(f" {k:>6}" for k in kinds))
    for s in splits:
        print(f"  {s:<13}" + "".join(f" {result['models'][k]['splits'][s]:>6.1%}" for k in kinds))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
