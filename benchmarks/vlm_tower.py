"""The tower stage of `spud vlm` alone, for choosing its settings: trains the tower of RUN's
vision config (plus overrides) and prints its validation exact match per question type (the
stage's own validation pictures: training split, another seed — never the eval's).

    python benchmarks/vlm_tower.py runs/demo --name T1 vlm.tower_steps=3600 [--out benchmarks/results/vlm_tower]

Each variant's tower and tower.json go to OUT/NAME/tower (reused when its settings are unchanged);
one JSON line per variant is appended to OUT/results.jsonl. docs/vision.md ("Measured") lists the
variants run with it."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from spud.posttrain.vlm import vlm_config
from spud.posttrain.vlm_tower import train_tower
from spud.ui import make_console


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("overrides", nargs="*", help="key=value settings (vlm.tower_steps=3600 ...)")
    ap.add_argument("--name", required=True, help="the variant's name (its directory under --out)")
    ap.add_argument("--out", default="benchmarks/results/vlm_tower")
    args = ap.parse_args()
    out = Path(args.out)
    cfg = vlm_config(args.run, None, out / args.name / "vlm", ["train.threads=2", *args.overrides], False)
    t0 = time.time()
    result = train_tower(cfg, out / args.name / "tower", make_console())
    row = {"name": args.name, "overrides": args.overrides, "wall_s": round(time.time() - t0, 1),
           "stage_wall_s": result.get("wall_s"), "val_exact": result.get("val_exact"),
           "curve": [(m["step"], m["val_exact"].get("number")) for m in result.get("metrics", [])]}
    print(json.dumps(row))
    out.mkdir(parents=True, exist_ok=True)
    with (out / "results.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
