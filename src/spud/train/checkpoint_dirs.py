"""Checkpoint directories: where they live, when one is complete, how one is published atomically."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

PREFIX = "step_"
COMPLETE = "COMPLETE"
DCP_METADATA = ".metadata"


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"{PREFIX}{step:07d}"


def _step_dirs(run_dir: Path) -> list[Path]:
    """Every step_NNNNNNN directory, complete or not, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)]
    found = [p for p in found if p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints (all their files present), oldest first; not checked for damage."""
    return [p for p in _step_dirs(run_dir) if is_complete(p)]


def is_sharded(ckpt: Path) -> bool:
    return (Path(ckpt) / DCP_METADATA).is_file()


def is_complete(ckpt: Path) -> bool:
    """Sharded (DCP): has the COMPLETE marker. Single-file: has state.json and its weights."""
    ckpt = Path(ckpt)
    if is_sharded(ckpt) or (ckpt / COMPLETE).exists():
        return (ckpt / COMPLETE).is_file() and (ckpt / "state.json").is_file()
    return (ckpt / "state.json").is_file() and (ckpt / "model.safetensors").is_file()


_UNSIZED = ("state.json", COMPLETE)


def file_sizes(ckpt: Path) -> dict[str, int]:
    """Size of every file of a checkpoint being written (state.json records them)."""
    return {p.name: p.stat().st_size for p in sorted(Path(ckpt).iterdir())
            if p.is_file() and p.name not in _UNSIZED}


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
