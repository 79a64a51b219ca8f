"""One step of `spud vlm`'s tower stage (spud.posttrain.vlm_tower), timed three ways in
alternating rounds so drifting machine load hits all of them alike:

- `convert`: each step's pictures converted from PIL (load_image), the stem's convolutions in
  the default NCHW layout — the stage as it was;
- `cached`: the training pictures converted once (vlm_tower.PIXEL_CACHE_BYTES), NCHW;
- `cached+nhwc`: cached, and the stem's convolutions channels-last (ConvStem.channels_last,
  the default).

A step is: pick 32 pictures, encode them (conv stem → pixel shuffle → projector, the demo's
d_model 128), a linear read-out of 475 outputs (the demo's answer positions × classes), cross
entropy, backward, AdamW — the stage's own work on the default tower.

    python benchmarks/vlm_tower_step.py [--rounds 5] [--steps 20] [--threads 2]

Prints median ms per step and the ratio to `convert`; writes benchmarks/results/vlm_tower_step.json."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from spud.config import ModelConfig, VisionConfig
from spud.data import images
from spud.model.vision import ConvStem, VisionTower, load_image

MODES = ("convert", "cached", "cached+nhwc")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20, help="steps per mode per round")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pictures", type=int, default=2000)
    ap.add_argument("--json", default="benchmarks/results/vlm_tower_step.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    vcfg = VisionConfig()
    mcfg = ModelConfig(d_model=128, n_layers=4, n_heads=4, vocab_size=4096, max_seq_len=256, vision=vcfg)
    torch.manual_seed(0)
    tower = VisionTower(mcfg)
    head = torch.nn.Linear(vcfg.tokens_per_image * mcfg.d_model, 475)
    opt = torch.optim.AdamW(list(tower.parameters()) + list(head.parameters()), lr=1e-3)
    pics = images.generate(args.pictures, 0, size=vcfg.image_size)
    cache = torch.stack([load_image(p.image, vcfg) for p in pics])
    gen = torch.Generator().manual_seed(0)

    def step(mode: str) -> None:
        idx = torch.randint(0, len(pics), (32,), generator=gen)
        if mode == "convert":
            x = torch.stack([load_image(pics[i].image, vcfg) for i in idx.tolist()])
        else:
            x = cache[idx]
        ConvStem.channels_last = mode == "cached+nhwc"
        logits = head(tower(x).flatten(1)).view(32, 25, 19)
        loss = F.cross_entropy(logits.flatten(0, 1), torch.randint(0, 19, (32 * 25,), generator=gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    times: dict[str, list[float]] = {m: [] for m in MODES}
    for m in MODES:  # warm-up: oneDNN picks and caches its kernels per layout
        for _ in range(3):
            step(m)
    for r in range(args.rounds):
        for m in MODES if r % 2 == 0 else MODES[::-1]:
            t = time.perf_counter()
            for _ in range(args.steps):
                step(m)
            times[m].append((time.perf_counter() - t) / args.steps * 1000)
    ConvStem.channels_last = True
    base = statistics.median(times["convert"])
    rows = {m: {"median_ms": round(statistics.median(v), 2), "ratio_to_convert": round(statistics.median(v) / base, 3),
                "rounds_ms": [round(x, 2) for x in v]} for m, v in times.items()}
    print(f"tower-stage step, 32 pictures, {args.threads} threads, {args.rounds} alternating rounds × {args.steps} steps")
    for m, row in rows.items():
        print(f"  {m:<12} {row['median_ms']:8.2f} ms   ×{row['ratio_to_convert']:.3f}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"threads": args.threads, "rounds": args.rounds, "steps": args.steps,
                               "torch": torch.__version__, "modes": rows}, indent=2))


if __name__ == "__main__":
    main()
