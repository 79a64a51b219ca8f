"""Scaling ladder: train a grid of small models × token budgets and record (N, D, C, loss).

Each (size, budget) pair is one ordinary spud run in out/<size>_<tokens>/, so it can be inspected,
resumed or sampled like any other. The data mix and tokenizer are built once in out/_shared/ and
copied into every run: all rungs then see the same tokens in the same order (same seed), so loss
differences come from N and D only. Results go to out/ladder.jsonl, one JSON object per run:

    {name, size, N (non-embedding params), N_total, D (tokens trained), C (= training FLOPs per
     token · D, spud's exact count), C_6ND, loss (final val loss, nats/token), bpb, steps, run_dir}

N is non-embedding parameters, following Kaplan et al. 2020 ("Scaling Laws for Neural Language
Models"), who found laws in N are much cleaner without the embedding matrices — which dominate
the tiny models of a CPU ladder.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from spud.config import Config, load_config
from spud.errors import SpudError
from spud.model.flops import flops_per_token, param_counts
from spud.model.presets import PRESETS

_SUFFIX = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def parse_tokens(text: str) -> list[int]:
    """'50k,200k' / '5e4,2e5' / '1M' → token counts."""
    out = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        m = re.fullmatch(r"([0-9.eE+-]+)\s*([kKmMbBgGtT]?)", item)
        try:
            value = float(m.group(1)) * _SUFFIX.get(m.group(2).lower(), 1) if m else None
        except ValueError:
            value = None
        if not value or value <= 0:
            raise SpudError(f"token budget {item!r} is not a positive number (e.g. 2e5, 200k, 1M)")
        out.append(int(value))
    if not out:
        raise SpudError("no token budgets given (e.g. --tokens 50k,200k)")
    return out


def size_overrides(size: str, base: Config) -> list[str]:
    """Overrides that turn the base recipe's model into `size` (a d_model or a preset name).

    A bare d_model keeps the base head_dim (n_heads = d_model / head_dim) and the base depth, so
    the ladder varies width only; a preset sets every field it names except max_seq_len, which
    stays the recipe's so every rung trains on the same windows.
    """
    if size in PRESETS:
        preset = PRESETS[size]
        out = [f"model.{k}={v}" for k, v in preset.items() if k != "max_seq_len"]
        # Fields the preset leaves unset must not leak in from the recipe's own model.
        out += [f"model.{k}=null" for k in ("n_kv_heads", "head_dim", "mlp_hidden") if k not in preset]
        return out
    try:
        d = int(size)
    except ValueError:
        raise SpudError(f"ladder size {size!r} is neither a d_model integer nor a preset ({', '.join(PRESETS)})") from None
    hd = base.model.dim_head
    if d <= 0 or d % hd:
        raise SpudError(f"ladder d_model={d} must be a positive multiple of the recipe's head_dim {hd}")
    return [f"model.d_model={d}", f"model.n_heads={d // hd}", "model.n_kv_heads=null",
            "model.head_dim=null", "model.mlp_hidden=null"]


def _run_config(config: str | None, overrides: list[str], size: str, tokens: int, vocab: int) -> tuple[Config, int]:
    """The rung's config, with max_steps = round(tokens / tokens_per_step); returns (cfg, steps)."""
    base = load_config(config, overrides)
    cfg = load_config(config, [*overrides, *size_overrides(size, base)])
    t = cfg.train
    micro = t.micro_batch_size * cfg.seq_len
    per_step = max(1, round((t.tokens_per_step or micro) / micro)) * micro  # as the Trainer rounds
    steps = max(1, round(tokens / per_step))
    cfg.train.max_steps = steps
    cfg.train.warmup_steps = min(t.warmup_steps, steps // 4)
    # Evaluate only at the start and the end and checkpoint only the end: a rung's product is
    # its final loss, and extra evals would dominate the wall-clock of tiny runs.
    cfg.train.eval_every = steps
    cfg.train.checkpoint_every = steps
    cfg.train.keep_checkpoints = 1
    cfg.model.vocab_size = cfg.model.vocab_size or (vocab + 63) // 64 * 64
    return cfg, steps


def record_from_run(run_dir: str | Path, name: str | None = None, size: str | None = None) -> dict:
    """A ladder row from a finished run directory (config.yaml + metrics.jsonl)."""
    from spud.train.metrics import read_metrics

    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise SpudError(f"{run} has no config.yaml: not a spud run directory")
    cfg = load_config(run / "config.yaml")
    records = read_metrics(run / "metrics.jsonl")
    vals = [r for r in records if r["kind"] == "val" and r.get("loss") is not None]
    trains = [r for r in records if r["kind"] == "train"]
    if not vals or not trains:
        raise SpudError(f"{run}/metrics.jsonl has no train and val records; is the run finished?")
    last = max(vals, key=lambda r: r["step"])
    step = max(r["step"] for r in trains)
    if last["step"] != step:
        raise SpudError(f"{run}: last val loss is at step {last['step']} but training reached {step}; "
                        "the final loss must be evaluated at the last step")
    tokens = next((r["tokens"] for r in reversed(trains) if r["step"] == step and "tokens" in r), None)
    if tokens is None:
        start = next((r for r in records if r.get("event") == "start"), {})
        tokens = step * start.get("tokens_per_step", cfg.train.micro_batch_size * cfg.seq_len)
    counts = param_counts(cfg.model)
    fpt = flops_per_token(cfg.model, cfg.seq_len)["training"]
    return {
        "name": name or run.name,
        "size": size,
        "d_model": cfg.model.d_model,
        "n_layers": cfg.model.n_layers,
        "N": counts["non_embedding"],
        "N_total": counts["total"],
        "D": int(tokens),
        "C": float(fpt) * tokens,
        "C_6ND": 6.0 * counts["non_embedding"] * tokens,
        "loss": float(last["loss"]),
        "bpb": last.get("bpb"),
        "steps": step,
        "seq_len": cfg.seq_len,
        "run_dir": str(run.resolve()),
    }


def register_run(ladder_path: str | Path, run_dir: str | Path, name: str | None = None,
                 size: str | None = None) -> dict:
    """Append a finished run (trained anywhere) to a ladder file; replaces an older row of the
    same run directory so registering twice does not double-count a point in the fit."""
    row = record_from_run(run_dir, name, size)
    path = Path(ladder_path)
    if path.is_dir():
        path = path / "ladder.jsonl"
    rows = [r for r in _read_rows(path) if r.get("run_dir") != row["run_dir"]]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in [*rows, row]), encoding="utf-8")
    return row


def _read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass
    return rows


def run_ladder(config: str | None, sizes: list[str], tokens: list[int], out: str | Path,
               overrides: list[str] | None = None, quiet: bool = False) -> list[dict]:
    """Train every (size, tokens) rung not already in out/ladder.jsonl; returns all rows."""
    from rich.console import Console

    from spud.data.build import build_dataset
    from spud.train.trainer import Trainer
    from spud.ui import make_console

    overrides = list(overrides or [])
    out = Path(out)
    shared = out / "_shared"
    console = Console(quiet=True) if quiet else make_console()
    base = load_config(config, overrides)
    build_dataset(base, shared, progress=not quiet, log=console.print)
    from spud.tokenizer import Tokenizer

    vocab = Tokenizer.load(shared / "tokenizer.json").vocab_size
    ladder = out / "ladder.jsonl"
    done = {r.get("run_dir") for r in _read_rows(ladder)}
    for size in sizes:
        for n_tok in tokens:
            name = f"{size}_{n_tok}"
            run = out / name
            if str(run.resolve()) in done:
                console.print(f"[dim]{name}: already in {ladder}, skipped")
                continue
            cfg, steps = _run_config(config, overrides, size, n_tok, vocab)
            if run.exists():
                try:  # finished earlier but not recorded (e.g. the ladder was interrupted)
                    register_run(ladder, run, name, size)
                    continue
                except SpudError:
                    shutil.rmtree(run)  # a half-finished rung: its loss is not a final loss
            run.mkdir(parents=True)
            shutil.copy(shared / "tokenizer.json", run / "tokenizer.json")
            shutil.copytree(shared / "data", run / "data")
            console.print(f"[bold]ladder rung {name}[/]: {steps} steps")
            summary = Trainer(cfg, run, console=console).run()
            if summary["interrupted"]:
                raise SpudError(f"ladder interrupted during {name}; rerun the same command to continue")
            register_run(ladder, run, name, size)
    return _read_rows(ladder)


def ladder_cmd(config: str, sizes: str, tokens: str, out: str, overrides: list[str] | None = None) -> dict:
    """`spud ladder --config R --sizes 64,128 --tokens 50k,200k --out DIR [key=value ...]`."""
    from rich.table import Table

    from spud.ui import make_console

    size_list = [s.strip() for s in sizes.split(",") if s.strip()]
    if not size_list:
        raise SpudError("no sizes given (e.g. --sizes 64,128 or --sizes nano,micro)")
    rows = run_ladder(config, size_list, parse_tokens(tokens), out, overrides)
    t = Table(title=f"ladder {Path(out) / 'ladder.jsonl'}")
    for c in ("run", "N (non-emb)", "D (tokens)", "C (FLOPs)", "val loss", "bpb"):
        t.add_column(c, justify="right")
    for r in rows:
        bpb = r.get("bpb")
        t.add_row(r["name"], f"{r['N']:,}", f"{r['D']:,}", f"{r['C']:.3g}", f"{r['loss']:.4f}",
                  f"{bpb:.4f}" if isinstance(bpb, (int, float)) else "-")
    make_console().print(t)
    return {"ladder": str(Path(out) / "ladder.jsonl"), "runs": rows}
