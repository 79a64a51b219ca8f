"""The vision tower's cost, measured: parameters, FLOPs per image (spud.model.flops.image_flops),
encode time per image, and what a prompt's images add to the language model's prefill.

For each tower shape (the default, no pixel shuffle, a wider ViT) on the demo language model
(d_model 128, 4 layers), in alternating rounds so drifting machine load hits all equally:
- encode:  `model.encode_images` on a batch of images (median ms per image);
- prefill: a forward over a prompt of `--text` text tokens plus one image's placeholders,
           with `image_embeds` given, vs the same length of text only (the merge's overhead);
- text:    the text-only model's forward on the same ids, built from the same config minus
           `model.vision` (must match the VLM without images: the tower costs nothing then).

    python benchmarks/vision_tower.py --rounds 5 --threads 1 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from spud.config import ModelConfig, VisionConfig
from spud.model.flops import image_flops, param_counts
from spud.model.transformer import Transformer

SHAPES = {
    "default (32px, p4, shuffle 2)": {},
    "no shuffle (64 tokens/image)": dict(pixel_shuffle=1),
    "ViT 6x192": dict(vit_dim=192, vit_layers=6, vit_heads=6),
}


def _ms(fn, reps: int) -> float:
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) * 1000 / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--images", type=int, default=32, help="batch of images encoded per call")
    ap.add_argument("--text", type=int, default=112, help="text tokens in the prefill prompt")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="write the rows here too")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    lm = dict(d_model=128, n_layers=4, n_heads=4, vocab_size=4096, max_seq_len=512)
    image_id = 4095
    rows, timers = [], []
    for name, kw in SHAPES.items():
        cfg = ModelConfig(**lm, vision=VisionConfig(image_token_id=image_id, **kw))
        model = Transformer(cfg).eval()
        text_model = Transformer(ModelConfig(**lm)).eval()
        t = cfg.vision.tokens_per_image
        px = torch.randn(args.images, 3, cfg.vision.image_size, cfg.vision.image_size)
        ids = torch.randint(0, 4000, (1, args.text + t))
        with_image = ids.clone()
        with_image[0, 8 : 8 + t] = image_id
        emb = model.encode_images(px[:1]).detach()
        row = {"tower": name, "tokens_per_image": t, "params": param_counts(cfg)["vision"],
               "mflops_per_image": image_flops(cfg)["forward"] / 1e6,
               "encode_ms": [], "prefill_image_ms": [], "prefill_text_ms": [], "text_model_ms": []}
        rows.append(row)
        timers.append((row, model, text_model, px, with_image, ids, emb))
    with torch.no_grad():
        for _ in range(args.rounds):
            for row, model, text_model, px, with_image, ids, emb in timers:
                row["encode_ms"].append(_ms(lambda: model.encode_images(px), 1) / len(px))
                row["prefill_image_ms"].append(_ms(lambda: model(with_image, image_embeds=emb), 3))
                row["prefill_text_ms"].append(_ms(lambda: model(ids), 3))
                row["text_model_ms"].append(_ms(lambda: text_model(ids), 3))
    print(f"threads {args.threads}, load average {os.getloadavg()[0]:.1f}, prompt {args.text} text "
          f"tokens + 1 image, median of {args.rounds} rounds")
    print(f"{'tower':32} {'tok/img':>7} {'params':>9} {'MFLOP/img':>9} {'encode ms/img':>13} "
          f"{'prefill+img ms':>14} {'same len text ms':>16} {'text model ms':>13}")
    for r in rows:
        for k in ("encode_ms", "prefill_image_ms", "prefill_text_ms", "text_model_ms"):
            r[k] = statistics.median(r[k])
        print(f"{r['tower']:32} {r['tokens_per_image']:>7} {r['params']:>9,} {r['mflops_per_image']:>9.1f} "
              f"{r['encode_ms']:>13.2f} {r['prefill_image_ms']:>14.2f} {r['prefill_text_ms']:>16.2f} "
              f"{r['text_model_ms']:>13.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
