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

The directory layout and the atomic publication are in checkpoint_dirs.py, the DCP format in
checkpoint_sharded.py; their public names are re-exported here.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from spud.errors import SpudError
from spud.train.checkpoint_dirs import (  # noqa: F401 - re-exported: callers use ckpt_io.list_checkpoints etc.
    COMPLETE,
    DCP_METADATA,
    PREFIX,
    _fsync_dir,
    _step_dirs,
    begin_save,
    checkpoint_dir,
    file_sizes,
    finish_save,
    is_complete,
    is_sharded,
    list_checkpoints,
)
from spud.train.checkpoint_sharded import (  # noqa: F401 - re-exported: callers use ckpt_io.save_sharded etc.
    load_full_into_sharded,
    load_sharded,
    save_sharded,
)

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
TRAINING_ONLY_FILES = ("optimizer.pt", "rng.pt", "train.safetensors")  # only resuming reads them


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


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    state: dict[str, Any],
    rng: dict | None,
    keep: int,
    extra_weights: dict[str, torch.nn.Module] | None = None,
) -> Path:
    """`extra_weights`: more modules saved beside model.safetensors, one safetensors file each
    (file name → module), e.g. the RL policy's own weights when model.safetensors is its average."""
    tmp, final = begin_save(run_dir, step)
    save_model(model, str(tmp / "model.safetensors"))
    for name, module in (extra_weights or {}).items():
        save_model(module, str(tmp / name))
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


def load_weights(ckpt: Path, model: torch.nn.Module, device: torch.device | str = "cpu",
                 name: str = "model.safetensors") -> None:
    path = ckpt / name
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


def load_rng(ckpt: Path, rank: int = 0) -> dict | None:
    """This rank's RNG state: rng_rankR.pt (sharded) or rng.pt (single-file); None if absent."""
    for name in (f"rng_rank{rank}.pt", "rng.pt"):
        if (ckpt / name).is_file():
            return _load_torch(ckpt / name)
    return None


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
