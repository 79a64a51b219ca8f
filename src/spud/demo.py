"""`spud demo`: the whole pipeline on the built-in offline mix, on CPU, in minutes.

data → tokenizer → pretraining → samples, then a summary of where everything went and how far
validation bits-per-byte fell. `--quick` shrinks data, model and steps to finish in under 2
minutes (used by the test suite).
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from spud.config import load_config
from spud.ui import make_console

QUICK_OVERRIDES = [
    "data.total_tokens=300000",
    "tokenizer.vocab_size=1024",
    "tokenizer.train_bytes=1000000",
    "model.n_layers=2",
    "model.max_seq_len=128",
    "train.micro_batch_size=16",
    "train.max_steps=120",
    "train.warmup_steps=10",
    "train.eval_every=40",
    "train.eval_batches=4",
    "train.checkpoint_every=60",
    "train.sample_tokens=24",
]


def run_demo(out: Path, quick: bool = False, console: Console | None = None) -> dict:
    from spud.train.checkpoint import latest_checkpoint
    from spud.train.trainer import Trainer

    console = console or make_console()
    recipe = Path(__file__).parent / "configs" / "demo.yaml"
    cfg = load_config(recipe, QUICK_OVERRIDES if quick else None)
    console.rule(f"[bold]spud demo{' (quick)' if quick else ''} → {out}")
    t0 = time.time()
    # A second `make demo` continues (or just reports) the same run rather than refusing it.
    resume = latest_checkpoint(out) is not None
    if resume:
        console.print(f"{out} already has a demo run: continuing it (use --out for a fresh one)")
    summary = Trainer(cfg, out, resume=resume, console=console).run()
    console.rule("[bold]samples")
    for s in summary["samples"]:
        if s["step"] == summary["step"]:
            console.print(f"▸ [cyan]{escape(s['prompt'])}[/cyan]{escape(s['text'])}", highlight=False)
    val = summary["val"]
    console.rule("[bold]summary")
    console.print(f"model: {summary['params'] / 1e6:.2f}M parameters, {summary['step']} steps, "
                  f"{summary['step'] * summary['tokens_per_step']:,} tokens, {time.time() - t0:.0f} s total")
    if val:
        console.print(f"validation bits/byte: {val[0]['bpb']:.3f} at step {val[0]['step']} → "
                      f"{val[-1]['bpb']:.3f} at step {val[-1]['step']}")
    console.print(f"run directory:  {out}/  (config.yaml, tokenizer.json, data/, checkpoints/, metrics.jsonl)")
    console.print(f"sample more:    spud sample {out} --prompt 'The ' --max-tokens 100")
    console.print(f"inspect:        spud info {out}")
    return summary
