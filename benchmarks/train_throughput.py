"""Training-step throughput of spud's Transformer vs its Hugging Face twin.

For each preset (with the default recipe; the twin is the transformers class `spud export hf`
writes for it, e.g. Qwen3ForCausalLM with QK-norm) both models get identical dimensions *and
identical weights* (spud.export.peer.hf_twin), the
same batch, sequence length, thread count and optimizer (AdamW), and run in the same process.
Timing alternates between the two models round by round, so drift in machine load (thermal,
neighbours on a shared VM) hits both equally; the median round is reported.

A step = forward + loss + backward + AdamW step + zero_grad. MFU = tokens/s × training FLOPs per
token (spud.model.flops, model-FLOP convention) / peak FLOP/s (spud.hardware; measured
matmul peak on CPU).

    python benchmarks/train_throughput.py --presets nano micro mini --batch 8 --seq 256
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from spud.config import ModelConfig
from spud.model.flops import flops_per_token, param_counts
from spud.model.registry import build_model
from spud.export.peer import hf_twin
from spud.hardware import cpu_name, peak_flops


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=["nano", "micro", "mini"])
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per model (alternating)")
    p.add_argument("--steps", type=int, default=3, help="training steps per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    p.add_argument("--out", default="benchmarks/results/train_throughput.json")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    # Same settings for both models; the fused CPU kernel (torch >= 2.4) when present, so the
    # optimizer is not what the comparison measures.
    try:
        return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)


def spud_step(model, opt, x, y) -> None:
    loss = model(x, y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def hf_step(model, opt, x, y) -> None:
    # Loss on the same (x, y) pairs as spud, from HF's logits; HF's own `labels=` path would
    # shift internally and drop one position per row, changing the work done.
    logits = model(input_ids=x).logits
    loss = F.cross_entropy(logits.view(-1, logits.shape[-1]).float(), y.view(-1))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def timed_round(step, model, opt, x, y, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        step(model, opt, x, y)
    return time.perf_counter() - t0


def bench_preset(name: str, args: argparse.Namespace, peak: float) -> dict:
    cfg = ModelConfig(preset=name, vocab_size=args.vocab, max_seq_len=max(args.seq, 256))
    torch.manual_seed(args.seed)
    spud = build_model(cfg).train()
    peer = hf_twin(spud, attn_implementation="sdpa", use_cache=False).train()

    x = torch.randint(0, args.vocab, (args.batch, args.seq))
    y = torch.randint(0, args.vocab, (args.batch, args.seq))
    with torch.no_grad():  # same weights ⇒ same function; prove it before timing anything
        max_diff = (spud(x) - peer(input_ids=x).logits).abs().max().item()

    runs = {"spud": (spud_step, spud, make_optimizer(spud)),
            "hf": (hf_step, peer, make_optimizer(peer))}
    for step, model, opt in runs.values():
        timed_round(step, model, opt, x, y, args.warmup)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(args.rounds):
        order = list(runs) if r % 2 == 0 else list(runs)[::-1]  # alternate who goes first
        for key in order:
            step, model, opt = runs[key]
            times[key].append(timed_round(step, model, opt, x, y, args.steps))

    tokens = args.batch * args.seq * args.steps
    train_flops = flops_per_token(cfg, args.seq)["training"]
    result = {
        "preset": name,
        "config": cfg.model_dump(),
        "params": param_counts(cfg),
        "train_flops_per_token": train_flops,
        "max_abs_logit_diff": max_diff,
    }
    for key, ts in times.items():
        tps = [tokens / t for t in ts]
        med = statistics.median(tps)
        result[key] = {"tokens_per_s_rounds": tps, "tokens_per_s": med,
                       "mfu": med * train_flops / peak}
    result["ratio"] = result["spud"]["tokens_per_s"] / result["hf"]["tokens_per_s"]
    return result


def print_table(results: list[dict], header: str) -> None:
    cols = ["preset", "params", "spud tok/s", "spud MFU", "HF tok/s", "HF MFU", "spud/HF"]
    rows = [[r["preset"], f"{r['params']['total'] / 1e6:.2f}M",
             f"{r['spud']['tokens_per_s']:,.0f}", f"{r['spud']['mfu']:.1%}",
             f"{r['hf']['tokens_per_s']:,.0f}", f"{r['hf']['mfu']:.1%}",
             f"{r['ratio']:.2f}x"] for r in results]
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=header)
        for c in cols:
            table.add_column(c, justify="left" if c == "preset" else "right")
        for row in rows:
            table.add_row(*row)
        Console().print(table)
    except ImportError:
        print(header)
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
        for line in [cols, *rows]:
            print("  ".join(v.rjust(w) for v, w in zip(line, widths, strict=True)))


def _loadavg() -> float:
    """1-minute load average (nan where the OS has none): a busy machine skews both models."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return float("nan")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import transformers
    except ImportError:
        print("needs Hugging Face transformers: pip install 'spud[bench]'", file=sys.stderr)
        return 1
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    peak = peak_flops(torch.device("cpu"), torch.float32)
    header = (f"train step fp32 CPU ({cpu_name()}, {threads} threads, measured peak "
              f"{peak / 1e9:.0f} GFLOP/s) batch={args.batch} seq={args.seq} "
              f"rounds={args.rounds}×{args.steps} steps, median")
    load_before = _loadavg()
    if load_before > 0.5:
        print(f"warning: 1-min load average is {load_before:.2f} before starting; other "
              "processes on these cores will distort the numbers", file=sys.stderr)
    results = [bench_preset(name, args, peak) for name in args.presets]
    load_after = _loadavg()
    print_table(results, header)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": "train_throughput",
        "device": "cpu", "cpu": cpu_name(), "threads": threads, "dtype": "float32",
        "peak_flops": peak, "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(),
        "loadavg_1min": {"before": load_before, "after": load_after},
        "args": vars(args), "results": results,
    }
    out.write_text(json.dumps(payload, indent=2), encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
