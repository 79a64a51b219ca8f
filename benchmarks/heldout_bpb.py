"""Bits per byte of runs' pretraining checkpoints on the validation split and on held-out corpora,
scored exactly as `spud ablate` scores its runs (spud.train.ablate_score.score_model: evenly
spaced validation windows, the first --heldout-tokens tokens of evenly spaced held-out documents).
Compares recipes trained elsewhere (e.g. two `make demo` runs) on text neither saw.

    python benchmarks/heldout_bpb.py RUN [RUN ...] [--checkpoints 750,1000,1100] \
        [--heldout stdlib_prose --heldout gnu=/usr/share/doc/gnu-standards] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run directories (their base model is scored)")
    p.add_argument("--checkpoints", default="", help="steps, comma-separated (default: the latest)")
    p.add_argument("--heldout", action="append", default=None, help="corpus spec (repeatable; default stdlib_prose)")
    p.add_argument("--heldout-tokens", type=int, default=32768)
    p.add_argument("--val-windows", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/heldout_bpb.json")
    args = p.parse_args(argv)

    import torch

    from spud.data.heldout import resolve_all
    from spud.runs import load_model
    from spud.train.ablate_score import score_model

    torch.set_num_threads(args.threads)
    corpora = resolve_all(args.heldout or ["stdlib_prose"])
    steps = [int(s) for s in args.checkpoints.split(",") if s.strip()] or [None]
    rows = []
    for run in args.runs:
        for step in steps:
            model, tok, cfg, ckpt = load_model(run, model="base", checkpoint=step)
            r = score_model(model, tok, cfg, Path(run), corpora, args.val_windows, args.heldout_tokens)
            row = {"run": run, "checkpoint": str(ckpt), "val_bpb": r.get("val_bpb"),
                   **{f"{name}_bpb": v["bpb"] for name, v in r["heldout"].items()}}
            rows.append(row)
            print("  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"heldout": [c.name for c in corpora], "rows": rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
