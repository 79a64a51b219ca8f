"""A VLM's exact match on *dev* pictures, for choosing `spud vlm` settings without touching the
eval: new pictures (a seed no stage draws from) of training-split facts, asked in the training
wordings, one table row per question type.

    python benchmarks/vlm_dev.py runs/demo/vlm [--per-type 200] [--seed 7919] [--name E]

Why not the held-out eval (`spud eval RUN --model vlm --tasks vqa`): settings chosen on it make
its figures optimistic; they are reported once, for the settings this script chose. The dev
pictures show facts (number and font, count and shape, ...) that training pictures also show,
in other places, sizes and colours, so dev reads higher than held-out; a variant is kept when it
wins on dev. The script checks by image hash that no dev picture is a training picture.
One JSON line per model is appended to benchmarks/results/vlm_dev.jsonl."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from spud.eval import vqa
from spud.runs import choose_model, load_choice

DEV_SEED = 7919  # the stages draw pictures from cfg.seed, +1 (validation) and +2 (samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="the VLM's directory (spud vlm's --out, e.g. runs/demo/vlm)")
    ap.add_argument("--per-type", type=int, default=200)
    ap.add_argument("--seed", type=int, default=DEV_SEED)
    ap.add_argument("--name", default=None, help="label for the JSON line (default: the run directory)")
    ap.add_argument("notes", nargs="*", help="recorded with the line (e.g. the variant's overrides)")
    ap.add_argument("--out", default="benchmarks/results/vlm_dev.jsonl")
    args = ap.parse_intermixed_args()  # notes may follow the options
    choice = choose_model(args.run, "vlm", None)
    net, tok, cfg = load_choice(choice, "cpu")
    if cfg.seed <= args.seed <= cfg.seed + 2:
        raise SystemExit(f"--seed {args.seed}: the vlm stages draw their pictures from seeds "
                         f"{cfg.seed}..{cfg.seed + 2}; choose another")
    items = vqa.vqa_items(cfg.model.vision.image_size, args.per_type, args.seed, held_out=False)
    t0 = time.monotonic()
    rows_by_type = vqa.answer_rows(net, tok, items)  # the eval's own answering and scoring
    seconds = round(time.monotonic() - t0, 1)
    overlap = vqa.training_overlap(cfg, items)
    exact = {t: round(sum(r["correct"] for r in rows) / len(rows), 4) for t, rows in rows_by_type.items()}
    row = {"name": args.name or args.run, "notes": args.notes, "checkpoint": str(choice.checkpoint),
           "seed": args.seed, "per_type": args.per_type, "image_overlap": overlap, "seconds": seconds,
           "exact": exact}
    print(f"dev pictures (seed {args.seed}, training-split facts) · {choice.checkpoint}")
    for t, v in exact.items():
        print(f"  {t:<11} {v:7.1%}   (n={len(rows_by_type[t])})")
    print(f"  training-picture overlap: {overlap.get('overlap')}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
