"""Checkpoints: `checkpoints/step_NNNNNNN/` holding everything needed to continue bit-for-bit.

- model.safetensors: weights (safetensors: no pickle, safe to load from anyone)
- optimizer.pt:      AdamW state (tensors + plain containers; loaded with weights_only=True)
- rng.pt:            python/numpy/torch RNG states
- state.json:        step, tokens seen, loader positions, the resolved config, metrics summary

A checkpoint is written into a hidden temp directory, fsynced, then renamed into place: rename is
atomic, so a directory named step_* is always complete, and a crash mid-write leaves only a temp
directory that the next save removes. Only the newest `keep` checkpoints are kept.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from spud.errors import SpudError

PREFIX = "step_"


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"{PREFIX}{step:07d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)]
    found = [p for p in found if (p / "state.json").is_file() and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def resolve_checkpoint(run_dir: Path, which: str | int | None = None) -> Path:
    """`which`: None/'latest', a step number, or a checkpoint directory name."""
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        raise SpudError(f"{run_dir}: no checkpoints found (train first: spud train CONFIG --out {run_dir})")
    if which in (None, "latest"):
        return ckpts[-1]
    for p in ckpts:
        if p.name == str(which) or p.name[len(PREFIX):].lstrip("0") == str(which).lstrip("0"):
            return p
    names = ", ".join(p.name for p in ckpts)
    raise SpudError(f"{run_dir}: no checkpoint {which!r}; available: {names}")


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    state: dict[str, Any],
    rng: dict | None,
    keep: int,
) -> Path:
    final = checkpoint_dir(run_dir, step)
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp_*"):  # leftovers of a crash mid-save
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp_{final.name}"
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    if rng is not None:
        torch.save(rng, tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2))
    _fsync_dir(tmp)
    if final.exists():  # re-saving the same step (e.g. Ctrl-C right after a periodic save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_state(ckpt: Path) -> dict[str, Any]:
    try:
        return json.loads((ckpt / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SpudError(f"{ckpt}/state.json is unreadable ({e}); delete this checkpoint") from None


def load_weights(ckpt: Path, model: torch.nn.Module, device: torch.device | str = "cpu") -> None:
    path = ckpt / "model.safetensors"
    try:
        missing, unexpected = load_model(model, str(path), strict=False, device=str(device))
    except FileNotFoundError:
        raise SpudError(f"{path} is missing; the checkpoint is incomplete") from None
    except RuntimeError as e:  # shape mismatch: the config does not describe these weights
        raise SpudError(f"{path} does not fit the model built from the config: {e}") from None
    if missing or unexpected:
        raise SpudError(
            f"{path} does not match the model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )


def load_training_state(ckpt: Path, optimizer: torch.optim.Optimizer) -> dict | None:
    """Loads optimizer state in place; returns the RNG state dict (or None if absent)."""
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
    rng_path = ckpt / "rng.pt"
    return torch.load(rng_path, weights_only=True) if rng_path.is_file() else None


def config_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Human-readable list of differing leaves between two config dicts."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += config_diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: checkpoint has {va!r}, requested {vb!r}")
    return out
