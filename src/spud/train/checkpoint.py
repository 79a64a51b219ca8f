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

Atomic writes do not protect against what happens later (a disk filling up during a copy, an
rsync cut short, bit rot). state.json therefore records the size of every file beside it, and
`checkpoint_problems` checks a checkpoint before anyone uses it: state.json parses and has its
keys, every file is present at its recorded size, the safetensors header covers the file, and (for
resuming training) optimizer.pt and rng.pt load. `latest_checkpoint` / `resolve_checkpoint` skip a
damaged checkpoint with a warning that names the damaged file and fall back to the newest intact
one; when none is intact they raise naming every damaged file.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable
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


_warned: set[str] = set()


def warn_stderr(message: str) -> None:
    """Once per process: a command may look for the latest checkpoint more than once."""
    if message not in _warned:
        _warned.add(message)
        print(f"warning: {message}", file=sys.stderr, flush=True)


def latest_checkpoint(run_dir: Path, training: bool = False,
                      warn: Callable[[str], None] = warn_stderr) -> Path | None:
    """The newest intact checkpoint (see `checkpoint_problems`; `training`: also what resuming
    needs), or None if the run has none. Newer damaged ones are named in one warning each; if
    every checkpoint is damaged, SpudError naming the damaged files."""
    damaged: list[tuple[Path, list[str]]] = []
    for ckpt in reversed(_step_dirs(run_dir)):
        problems = checkpoint_problems(ckpt, training)
        if not problems:
            for bad, why in damaged:
                warn(f"checkpoint {bad.name} is damaged: {'; '.join(why)}. Falling back to {ckpt.name}")
            return ckpt
        damaged.append((ckpt, problems))
    if damaged:
        lines = "\n  ".join(p for _, why in damaged for p in why)
        raise SpudError(f"{run_dir}: no intact checkpoint; every one is damaged:\n  {lines}\n"
                        "Restore them from a copy, or delete them and train again.")
    return None


def resolve_checkpoint(run_dir: Path, which: str | int | None = None, training: bool = False,
                       warn: Callable[[str], None] = warn_stderr) -> Path:
    """`which`: None/'latest' (the newest intact one), a step number, or a directory name."""
    if which in (None, "latest"):
        ckpt = latest_checkpoint(run_dir, training, warn)
        if ckpt is None:
            raise SpudError(f"{run_dir}: no checkpoints found (train first: spud train CONFIG --out {run_dir})")
        return ckpt
    ckpts = _step_dirs(run_dir)
    if not ckpts:
        raise SpudError(f"{run_dir}: no checkpoints found (train first: spud train CONFIG --out {run_dir})")
    for p in ckpts:
        if p.name == str(which) or p.name[len(PREFIX):].lstrip("0") == str(which).lstrip("0"):
            problems = checkpoint_problems(p, training)
            if problems:
                raise SpudError(f"checkpoint {p.name} is damaged: {'; '.join(problems)}. "
                                "Choose another checkpoint (or 'latest' for the newest intact one)")
            return p
    names = ", ".join(p.name for p in ckpts)
    raise SpudError(f"{run_dir}: no checkpoint {which!r}; available: {names}")


# ---------------------------------------------------------------------------------- integrity
STATE_KEYS = {"step": int, "config": dict}
TRAINING_STATE_KEYS = {"tokens_seen": int, "loader": dict}
_UNSIZED = ("state.json", COMPLETE)
TRAINING_ONLY_FILES = ("optimizer.pt", "rng.pt")  # written after the sizes are taken


def file_sizes(ckpt: Path) -> dict[str, int]:
    """Size of every file of a checkpoint being written (state.json records them)."""
    return {p.name: p.stat().st_size for p in sorted(Path(ckpt).iterdir())
            if p.is_file() and p.name not in _UNSIZED}


def _torch_file_problem(path: Path, kind: type, keys: tuple[str, ...] = ()) -> str | None:
    """None if `path` loads (weights_only; mmap: the zip index is checked, tensors stay on disk)
    as a `kind` with `keys`, else why not."""
    try:
        obj = torch.load(path, weights_only=True, mmap=True, map_location="cpu")
    except FileNotFoundError:
        return f"{path.name} is missing"
    except Exception as e:  # torch raises OSError, RuntimeError, EOFError, UnpicklingError, ...
        return f"{path.name} does not load ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    if not isinstance(obj, kind) or any(k not in obj for k in keys):
        return f"{path.name} does not hold the expected {kind.__name__}"
    return None


def checkpoint_problems(ckpt: Path, training: bool = False) -> list[str]:
    """What is wrong with a checkpoint, one message per damaged file naming it; [] when intact.
    `training`: also check what only resuming needs (optimizer and RNG state)."""
    from safetensors import safe_open

    ckpt = Path(ckpt)
    problems: list[str] = []
    state_path = ckpt / "state.json"
    state: Any = None
    try:
        state = json.loads(state_path.read_text())
    except FileNotFoundError:
        problems.append("state.json is missing")
    except (OSError, ValueError) as e:
        problems.append(f"state.json is not valid JSON ({e})")
    if state is not None:
        wanted = {**STATE_KEYS, **(TRAINING_STATE_KEYS if training else {})}
        bad = [k for k, t in wanted.items() if not isinstance(state, dict) or not isinstance(state.get(k), t)
               or isinstance(state.get(k), bool)]
        if bad:
            problems.append(f"state.json lacks {', '.join(bad)}")
        elif ckpt.name.startswith(PREFIX) and state["step"] != int(ckpt.name[len(PREFIX):]):
            problems.append(f"state.json says step {state['step']}, not {int(ckpt.name[len(PREFIX):])}")
        sizes = state.get("files") if isinstance(state, dict) else None
        for name, size in (sizes or {}).items():
            if not training and (name in TRAINING_ONLY_FILES or name.startswith("rng_rank")):
                continue  # sample/serve/eval never read them: a damaged one does not matter there
            path = ckpt / name
            if not path.is_file():
                problems.append(f"{name} is missing")
            elif path.stat().st_size != size:
                problems.append(f"{name} has {path.stat().st_size:,} bytes, {size:,} when written (truncated?)")
    if is_sharded(ckpt) or (ckpt / COMPLETE).exists():
        if not (ckpt / COMPLETE).is_file():
            problems.append(f"{COMPLETE} marker is missing (the save did not finish)")
        if not (ckpt / DCP_METADATA).is_file() or not (ckpt / DCP_METADATA).stat().st_size:
            problems.append(f"{DCP_METADATA} is missing or empty")
        if not any(ckpt.glob("*.distcp")):
            problems.append("no *.distcp shard files")
    else:
        model_path = ckpt / "model.safetensors"
        try:  # parses the header and checks that the tensors it lists fit in the file
            with safe_open(str(model_path), framework="pt"):
                pass
        except FileNotFoundError:
            problems.append("model.safetensors is missing")
        except Exception as e:  # SafetensorError, OSError
            problems.append(f"model.safetensors is damaged ({str(e).splitlines()[0][:120]})")
        if training:
            problems += filter(None, [_torch_file_problem(ckpt / "optimizer.pt", dict, ("state", "param_groups"))])
            if (ckpt / "rng.pt").exists():
                problems += filter(None, [_torch_file_problem(ckpt / "rng.pt", dict)])
    return [f"{ckpt}/{p}" for p in problems]  # each starts with the damaged file's path


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
    state = {"step": step, **state, "files": file_sizes(tmp)}
    (tmp / "state.json").write_text(json.dumps(state, indent=2))
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
    except Exception as e:  # SafetensorError, OSError: damaged since it was checked
        raise SpudError(f"{path} is damaged: {e}") from None
    if missing or unexpected:
        raise SpudError(
            f"{path} does not match the model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )


def load_training_state(ckpt: Path, optimizer: torch.optim.Optimizer) -> dict | None:
    """Loads optimizer state in place; returns the RNG state dict (or None if absent)."""
    optimizer.load_state_dict(_load_torch(ckpt / "optimizer.pt"))
    rng_path = ckpt / "rng.pt"
    return _load_torch(rng_path) if rng_path.is_file() else None


def _load_torch(path: Path) -> Any:
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:  # damaged since checkpoint_problems looked at it
        raise SpudError(f"{path} is damaged ({type(e).__name__}: {e}); resume from an earlier checkpoint") from None


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
        state = {"step": step, "sharded": True, **state, "files": file_sizes(tmp)}
        (tmp / "state.json").write_text(json.dumps(state, indent=2))
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
            return _load_torch(ckpt / name)
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


def config_diff(a: dict, b: dict, prefix: str = "",
                labels: tuple[str, str] = ("checkpoint has", "requested")) -> list[str]:
    """Human-readable list of differing leaves between two config dicts."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += config_diff(va, vb, f"{prefix}{k}.", labels)
        elif va != vb:
            out.append(f"{prefix}{k}: {labels[0]} {va!r}, {labels[1]} {vb!r}")
    return out


def config_for_resume(run_dir: Path, overrides: list[str], warn: Callable[[str], None] = warn_stderr):
    """The config to continue a run with when no CONFIG is given: the one stored in the newest
    intact checkpoint (what the run really trained with) plus `overrides`, or None if the run
    has no checkpoint. config.yaml is only a copy for people to read: when it is unreadable or
    differs (e.g. cut off by a crash while it was written), the checkpoint's config wins and every
    differing field is named in a warning. Damaged checkpoints are reported by the Trainer."""
    import yaml

    from spud.config import _merge, parse_overrides, validate_config

    run_dir = Path(run_dir)
    ckpt = latest_checkpoint(run_dir, training=True, warn=lambda _m: None)
    if ckpt is None:
        return None
    tree = read_state(ckpt)["config"]
    saved = validate_config(tree, f"{ckpt}/state.json")
    path = run_dir / "config.yaml"
    on_disk = None
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(loaded, dict):
            raise SpudError(f"{path}: the top level is not a mapping")
        on_disk = validate_config(loaded, str(path))
    except FileNotFoundError:
        pass
    except (OSError, UnicodeDecodeError, yaml.YAMLError, SpudError) as e:
        why = " ".join(str(e).split())[:300]
        warn(f"{path} is unreadable or invalid ({why}); resuming with the config stored in {ckpt.name}")
    if on_disk is not None:
        diff = config_diff(saved.model_dump(mode="json"), on_disk.model_dump(mode="json"), "",
                           (f"{ckpt.name} has", "config.yaml has"))
        if diff:
            warn(f"{path} differs from the config stored in {ckpt.name}; resuming with the "
                 "checkpoint's:\n  " + "\n  ".join(diff))
    if not overrides:
        return saved
    return validate_config(_merge(tree, parse_overrides(overrides), ""), f"{ckpt}/state.json + overrides")
