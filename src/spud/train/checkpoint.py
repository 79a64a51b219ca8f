"""Checkpoints: `checkpoints/step_NNNNNNN/` holding everything needed to continue bit-for-bit.

- model.safetensors: weights (safetensors: no pickle, safe to load from anyone)
- optimizer.pt:      AdamW state (tensors + plain containers; loaded with weights_only=True)
- rng.pt:            python/numpy/torch RNG states
- state.json:        step, tokens seen, loader positions, the resolved config, metrics summary

Data-parallel runs (train.parallel=ddp|fsdp under torchrun) write a sharded checkpoint instead,
with torch.distributed.checkpoint (DCP), readable at any number of ranks (resharding):

- __R_0.distcp + .metadata: model and AdamW state, each rank writing its own shards
- rng_rankR.pt:      each rank's RNG states
- state.json:        as above (written by rank 0)
- COMPLETE:          written by rank 0 once every rank has finished (after a barrier)

A checkpoint is written into a hidden temp directory, fsynced, then renamed into place: rename is
atomic, so a directory named step_* is always complete, and a crash mid-write leaves only a temp
directory that the next save removes. Directories are also renamed away before being deleted, so
a crash while pruning or replacing never leaves a half-deleted step_*. `list_checkpoints` accepts
a sharded checkpoint only with its COMPLETE marker. Only the newest `keep` checkpoints are kept.
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
COMPLETE = "COMPLETE"
DCP_METADATA = ".metadata"


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"{PREFIX}{step:07d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)]
    found = [p for p in found if p.name[len(PREFIX):].isdigit() and is_complete(p)]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def is_sharded(ckpt: Path) -> bool:
    return (Path(ckpt) / DCP_METADATA).is_file()


def is_complete(ckpt: Path) -> bool:
    """Sharded (DCP): has the COMPLETE marker. Single-file: has state.json and its weights."""
    ckpt = Path(ckpt)
    if is_sharded(ckpt) or (ckpt / COMPLETE).exists():
        return (ckpt / COMPLETE).is_file() and (ckpt / "state.json").is_file()
    return (ckpt / "state.json").is_file() and (ckpt / "model.safetensors").is_file()


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


def _fsync_dir(path: Path, names: list[str] | None = None) -> None:
    for f in path.iterdir():
        if names is None or f.name in names:
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def _fsync_path(path: Path) -> None:
    """fsync a directory entry itself (makes a rename durable); best effort off POSIX."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    """Rename away first (atomic), then delete: a crash never leaves a half-deleted step_*."""
    trash = path.parent / f".tmp_del_{path.name}"
    if trash.exists():
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def begin_save(run_dir: Path, step: int) -> tuple[Path, Path]:
    """Fresh temp directory for step's checkpoint (stale temp dirs of a crash are removed)."""
    final = checkpoint_dir(run_dir, step)
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp_*"):  # leftovers of a crash mid-save
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp_{final.name}"
    tmp.mkdir()
    return tmp, final


def finish_save(run_dir: Path, tmp: Path, final: Path, keep: int) -> Path:
    """Atomically publish a fully written (and fsynced) temp dir; prune old checkpoints."""
    if final.exists():  # re-saving the same step (e.g. Ctrl-C right after a periodic save)
        _remove(final)
    os.replace(tmp, final)
    _fsync_path(final.parent)
    for old in list_checkpoints(run_dir)[:-keep]:
        _remove(old)
    return final


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    state: dict[str, Any],
    rng: dict | None,
    keep: int,
) -> Path:
    tmp, final = begin_save(run_dir, step)
    save_model(model, str(tmp / "model.safetensors"))
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    if rng is not None:
        torch.save(rng, tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2))
    _fsync_dir(tmp)
    return finish_save(run_dir, tmp, final, keep)


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


# ---------------------------------------------------------------- sharded (DCP) checkpoints
def _dist_barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def save_sharded(run_dir: Path, step: int, model: torch.nn.Module, optimizer, state: dict[str, Any],
                 rng: dict, keep: int, rank: int) -> Path:
    """Collective: every rank calls it. Model + optimizer via DCP, per-rank RNG, then rank 0
    publishes (state.json, COMPLETE, rename) once every rank's files are on disk."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final = checkpoint_dir(run_dir, step)
    tmp = final.parent / f".tmp_{final.name}"
    if rank == 0:
        begin_save(run_dir, step)
    _dist_barrier()
    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp))
    torch.save(rng, tmp / f"rng_rank{rank}.pt")
    _fsync_dir(tmp, [f"rng_rank{rank}.pt", f"__{rank}_0.distcp"])
    _dist_barrier()
    if rank == 0:
        (tmp / "state.json").write_text(json.dumps({"step": step, "sharded": True, **state}, indent=2))
        _fsync_dir(tmp)
        (tmp / COMPLETE).write_text("ok\n")
        _fsync_dir(tmp, [COMPLETE])
        finish_save(run_dir, tmp, final, keep)
    _dist_barrier()
    return final


def load_sharded(ckpt: Path, model: torch.nn.Module, optimizer=None) -> None:
    """Load a DCP checkpoint into `model` (+ optimizer) as they are sharded now: at any number of
    ranks, or in a single process without a process group (resharding)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    if optimizer is None:
        msd = get_model_state_dict(model)
        dcp.load({"model": msd}, checkpoint_id=str(ckpt))
        set_model_state_dict(model, msd)
        return
    msd, osd = get_state_dict(model, optimizer)
    sd = {"model": msd, "optim": osd}
    dcp.load(sd, checkpoint_id=str(ckpt))
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])


def load_rng(ckpt: Path, rank: int = 0) -> dict | None:
    """This rank's RNG state: rng_rankR.pt (sharded) or rng.pt (single-file); None if absent."""
    for name in (f"rng_rank{rank}.pt", "rng.pt"):
        if (ckpt / name).is_file():
            return torch.load(ckpt / name, weights_only=True)
    return None


def load_full_into_sharded(ckpt: Path, model: torch.nn.Module, optimizer) -> None:
    """A single-file checkpoint into a data-parallel (possibly FSDP-sharded) model and optimizer:
    the resharding direction 1 → N. Every rank reads the full files and keeps its shard."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    weights = load_file(str(ckpt / "model.safetensors"))
    aliases: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    for names in aliases.values():  # tied weights are stored once
        have = [n for n in names if n in weights]
        for n in names:
            if n not in weights and have:
                weights[n] = weights[have[0]]
    name_of = {pid: names[0] for pid, names in aliases.items()}
    fqns = [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]
    raw = torch.load(ckpt / "optimizer.pt", weights_only=True)
    osd = {"state": {fqns[i]: v for i, v in raw["state"].items()},
           "param_groups": [{**g, "params": [fqns[i] for i in g["params"]]} for g in raw["param_groups"]]}
    set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=osd,
                   options=StateDictOptions(full_state_dict=True, strict=False))


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
