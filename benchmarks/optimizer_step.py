"""Wall-clock per training step with Muon vs AdamW (train.optimizer=muon | adamw) on this machine.

Claim under test (issue 11): a Muon step costs at most 15 % more wall-clock than an AdamW step.
Both optimizers get the same model (identical initial weights), batch and thread count, in the
same process; timing alternates between them round by round, so drift in machine load hits both
alike, and the median round is reported. A step is what the trainer does: forward + loss +
backward + global-norm clip + optimizer step + zero_grad. The optimizer step alone is also timed
(median over the same rounds), since that is the only part that differs.

Sizes: `demo` is configs/demo.yaml's model and batch (nano: d=128, 4 layers, vocab 4096,
16×256 tokens); `4x` doubles width and depth (d=256, 8 layers: 4× width·depth) at the same batch.

    python benchmarks/optimizer_step.py [--sizes demo 4x] [--rounds 7] [--steps 3] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from spud.config import ModelConfig, TrainConfig
from spud.hardware import cpu_name
from spud.model.flops import param_counts
from spud.model.registry import build_model
from spud.train.optim import apply_schedule, build_optimizer

SIZES = {
    "demo": dict(preset="nano", max_seq_len=256),
    "4x": dict(d_model=256, n_layers=8, n_heads=4, max_seq_len=256),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--batch", type=int, default=16, help="sequences per step (demo: 16)")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rounds", type=int, default=7, help="timed rounds per optimizer (alternating)")
    p.add_argument("--steps", type=int, default=3, help="training steps per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per optimizer first")
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    p.add_argument("--out", default="benchmarks/results/optimizer_step.json")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


class Runner:
    """One model + optimizer, stepping exactly as the trainer does."""

    def __init__(self, model: torch.nn.Module, optimizer: str) -> None:
        self.model = model
        self.cfg = TrainConfig(optimizer=optimizer)
        self.opt = build_optimizer(model, self.cfg, torch.device("cpu"))
        self.opt_times: list[float] = []

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        apply_schedule(self.opt, self.cfg.lr, 100, self.cfg)
        self.model(x, y).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        t0 = time.perf_counter()
        self.opt.step()
        self.opt_times.append(time.perf_counter() - t0)
        self.opt.zero_grad(set_to_none=True)

    def round(self, x, y, steps: int) -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step(x, y)
        return (time.perf_counter() - t0) / steps


def bench_size(name: str, args: argparse.Namespace) -> dict:
    cfg = ModelConfig(**SIZES[name], vocab_size=args.vocab)
    torch.manual_seed(args.seed)
    model = build_model(cfg).train()
    runners = {"adamw": Runner(model, "adamw"), "muon": Runner(copy.deepcopy(model), "muon")}
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    y = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    for r in runners.values():
        r.round(x, y, args.warmup)
        r.opt_times.clear()
    times: dict[str, list[float]] = {k: [] for k in runners}
    for i in range(args.rounds):
        order = list(runners) if i % 2 == 0 else list(runners)[::-1]  # alternate who goes first
        for key in order:
            times[key].append(runners[key].round(x, y, args.steps))
    out = {"size": name, "config": cfg.model_dump(), "params": param_counts(cfg),
           "tokens_per_step": args.batch * args.seq}
    for key, ts in times.items():
        out[key] = {"step_s": statistics.median(ts), "step_s_rounds": ts,
                    "optimizer_step_s": statistics.median(runners[key].opt_times)}
    out["muon_over_adamw"] = out["muon"]["step_s"] / out["adamw"]["step_s"]
    return out


def print_table(results: list[dict], header: str) -> None:
    cols = ["size", "params", "AdamW step", "Muon step", "Muon/AdamW", "AdamW opt.step", "Muon opt.step"]
    rows = [[r["size"], f"{r['params']['total'] / 1e6:.2f}M", f"{r['adamw']['step_s'] * 1e3:.1f} ms",
             f"{r['muon']['step_s'] * 1e3:.1f} ms", f"{r['muon_over_adamw']:.3f}",
             f"{r['adamw']['optimizer_step_s'] * 1e3:.1f} ms", f"{r['muon']['optimizer_step_s'] * 1e3:.1f} ms"]
            for r in results]
    print(header)
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    for line in [cols, *rows]:
        print("  ".join(v.rjust(w) for v, w in zip(line, widths, strict=True)))


def _loadavg() -> float:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return float("nan")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    load_before = _loadavg()
    if load_before > 0.5:
        print(f"warning: 1-min load average is {load_before:.2f} before starting; other processes on "
              "these cores distort the absolute numbers (alternating rounds keep the ratio fairer)",
              file=sys.stderr)
    results = [bench_size(name, args) for name in args.sizes]
    load_after = _loadavg()
    header = (f"train step, fp32 CPU ({cpu_name()}, {threads} threads), batch {args.batch}×{args.seq}, "
              f"median of {args.rounds} alternating rounds × {args.steps} steps; "
              f"load avg {load_before:.2f} → {load_after:.2f}")
    print_table(results, header)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": "optimizer_step", "device": "cpu", "cpu": cpu_name(), "threads": threads,
               "dtype": "float32", "torch": torch.__version__, "python": platform.python_version(),
               "loadavg_1min": {"before": load_before, "after": load_after}, "args": vars(args),
               "target": "Muon step within 15% of AdamW's (muon_over_adamw <= 1.15)", "results": results}
    out.write_text(json.dumps(payload, indent=2), encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
