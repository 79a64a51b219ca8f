"""A sheet of held-out pictures with a question each and the vision model's greedy answer
(docs/img/vision_examples.png): the same pictures and questions as `spud eval --tasks vqa`.

    python benchmarks/vlm_examples.py RUN [--per-type 2] [--out docs/img/vision_examples.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from spud.eval.vqa import QUESTION_TYPES, greedy_answers, normalise, vqa_items
from spud.runs import load_model

CELL, SCALE = 200, 4  # a 32-pixel picture is shown at 128 pixels, nearest-neighbour


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--per-type", type=int, default=2)
    ap.add_argument("--types", default=",".join(QUESTION_TYPES))
    ap.add_argument("--seed", type=int, default=1234, help="the eval's seed (spud eval --seed)")
    ap.add_argument("--out", default="docs/img/vision_examples.png")
    args = ap.parse_args()
    model, tok, cfg, ckpt = load_model(args.run, model="vlm", device="cpu")
    types = [t for t in args.types.split(",") if t]
    items = [it for it in vqa_items(cfg.model.vision.image_size, args.per_type, args.seed) if it.qtype in types]
    answers = greedy_answers(model, tok, [it.question for it in items], [it.image for it in items])
    cols = 4
    rows = (len(items) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * CELL, rows * (CELL + 20)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=12)
    for i, (it, ans) in enumerate(zip(items, answers)):
        x, y = (i % cols) * CELL, (i // cols) * (CELL + 20)
        pic = it.image.resize((it.image.width * SCALE, it.image.height * SCALE), Image.Resampling.NEAREST)
        sheet.paste(pic, (x + (CELL - pic.width) // 2, y + 4))
        ok = normalise(ans) == it.answer
        draw.text((x + 6, y + pic.height + 10), it.question[:34], fill=(0, 0, 0), font=font)
        draw.text((x + 6, y + pic.height + 28), f"model: {ans.strip()[:18]}", font=font,
                  fill=(0, 130, 0) if ok else (200, 0, 0))
        draw.text((x + 6, y + pic.height + 46), f"answer: {it.answer}", fill=(90, 90, 90), font=font)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out)
    right = sum(normalise(a) == it.answer for it, a in zip(items, answers))
    print(f"{ckpt}: {right}/{len(items)} right; wrote {args.out}")


if __name__ == "__main__":
    main()
