"""`spud info`: what a run contains, or how big a preset is (parameters and FLOPs per token)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from spud.config import ModelConfig
from spud.errors import SpudError
from spud.model.flops import flops_per_token, image_flops, param_counts
from spud.model.presets import PRESETS
from spud.ui import make_console


def _fmt(n: float) -> str:
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def preset_table(names: list[str], vocab: int, seq_len: int | None) -> Table:
    table = Table(title=f"model presets (vocab {vocab})")
    for col in ("preset", "d_model", "layers", "heads/kv", "mlp", "params", "non-emb params",
                "seq", "train FLOPs/token"):
        table.add_column(col, justify="right" if col not in ("preset", "mlp") else "left")
    for name in names:
        cfg = ModelConfig(preset=name, vocab_size=vocab)
        counts = param_counts(cfg)
        t = seq_len or cfg.max_seq_len
        fl = flops_per_token(cfg, t)
        table.add_row(name, str(cfg.d_model), str(cfg.n_layers), f"{cfg.n_heads}/{cfg.kv_heads}",
                      f"{cfg.mlp} {cfg.hidden}", _fmt(counts["total"]), _fmt(counts["non_embedding"]),
                      str(t), _fmt(fl["training"]))
    return table


# Model fields that choose the architecture (the rest are sizes): listed by `spud info` with
# their defaults; every field after init_std (ModelConfig.arch_options) is listed too.
ARCH_FIELDS = ("block", "mlp", "qk_norm", "logit_softcap", "tie_embeddings")


def options_table() -> Table:
    """Every architecture choice: registry entries for block / mlp, then each option switch."""
    from spud.model.registry import choices

    table = Table(title="architecture options (set as model.<option>=value; docs/architecture.md)")
    for col in ("option", "default", "choices / meaning"):
        table.add_column(col)
    fields = ModelConfig.model_fields
    names = list(fields)
    for name in (*ARCH_FIELDS, *names[names.index("init_std") + 1 :]):
        f = fields[name]
        text = f.description or ""
        if name in ("block", "mlp"):
            text = "\n".join(f"{k}: {(cls.__doc__ or '').strip().splitlines()[0]}"
                              for k, cls in sorted(choices(name).items()))
        if name == "vision":  # its encoder types, from the registry (docs/architecture.md)
            text += "".join(f"\nvision.encoder={k}: {(cls.__doc__ or '').strip().splitlines()[0]}"
                            for k, cls in sorted(choices("vision.encoder").items()))
        table.add_row(name, repr(f.default), escape(text))
    return table


def show_info(run: str | None, preset: str | None, vocab: int, seq_len: int | None,
              console: Console | None = None) -> None:
    console = console or make_console()
    if preset:
        names = list(PRESETS) if preset == "all" else [preset]
        unknown = [n for n in names if n not in PRESETS]
        if unknown:
            raise SpudError(f"unknown preset {unknown[0]!r}; known: {', '.join(PRESETS)} (or 'all')")
        console.print(preset_table(names, vocab, seq_len))
    if run:
        show_run(Path(run), console)
    if not preset and not run:
        console.print(preset_table(list(PRESETS), vocab, seq_len))
        console.print(options_table())


def vision_line(model: ModelConfig, params: int) -> str:
    """One line on the vision tower: shape, tokens per image, parameters, FLOPs per image."""
    v = model.vision
    # vit_layers 0 (the default) is a stem-only tower: say so rather than "ViT 0×96d".
    layers = f"{v.vit_layers}×{v.vit_dim}d" if v.vit_layers else f"{v.vit_dim}d, no transformer layers"
    enc = (f"ViT {layers} ({v.vit_stem} stem)" if v.encoder == "vit" else f"{v.encoder} {v.hf_path}")
    fl = image_flops(model)
    return (f"vision: {enc}, {v.image_size}px images in {v.patch_size}px patches → "
            f"{v.tokens_per_image} tokens/image (pixel shuffle {v.pixel_shuffle}), {_fmt(params)} "
            f"params, {_fmt(fl['forward'])} FLOPs/image forward, {_fmt(fl['training'])} training "
            f"({_fmt(fl['training_frozen_encoder'])} with the encoder frozen)")


def show_run(run: Path, console: Console) -> None:
    from spud.data.shards import load_manifest
    from spud.runs import load_run_config
    from spud.train.checkpoint import list_checkpoints, read_state
    from spud.train.metrics import read_metrics

    cfg = load_run_config(run)
    console.print(f"[bold]{run}[/bold]")
    if cfg.model.vocab_size:
        counts = param_counts(cfg.model)
        fl = flops_per_token(cfg.model, cfg.seq_len)
        console.print(f"model: {cfg.model.d_model}d × {cfg.model.n_layers} layers, "
                      f"{_fmt(counts['total'])} params, {_fmt(fl['training'])} train FLOPs/token")
        opts = {"block": cfg.model.block, "mlp": cfg.model.mlp, **cfg.model.arch_options()}
        opts.pop("vision", None)
        console.print("architecture: " + ", ".join(f"{k}={v}" for k, v in opts.items()),
                      markup=False, highlight=False)
        if cfg.model.vision is not None:
            console.print(vision_line(cfg.model, counts["vision"]), markup=False, highlight=False)
    if (run / "data" / "manifest.json").is_file():
        m = load_manifest(run)  # a corrupt manifest is a clear SpudError, not a traceback
        table = Table(title=f"data mix ({m['train_tokens']:,} train / {m['val_tokens']:,} val tokens)")
        for col in ("source", "documents", "train tokens", "epochs", "skipped"):
            table.add_column(col, justify="left" if col == "source" else "right")
        for s in m["sources"]:
            skipped = sum(s.get("skipped", {}).values())
            table.add_row(s["name"], f"{s['documents']:,}", f"{s['train_tokens']:,}",
                          "generated" if s.get("infinite") else f"{s['epochs']:.2f}", str(skipped))
        console.print(table)
    ckpts = list_checkpoints(run)
    if ckpts:
        last = read_state(ckpts[-1])
        val = last.get("val") or {}
        console.print(f"checkpoints: {', '.join(p.name for p in ckpts)} "
                      f"(latest: {last.get('tokens_seen', 0):,} tokens"
                      + (f", val bpb {val['bpb']:.3f}" if val.get("bpb") else "") + ")")
    vals = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "val"]
    if vals:
        console.print("val bpb: " + "  ".join(f"{r['step']}:{r['bpb']:.3f}" for r in vals))
