"""Sharded (DCP) checkpoints of data-parallel runs: the collective save and the resharding loads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from spud.train.checkpoint_dirs import (
    COMPLETE,
    _fsync_dir,
    begin_save,
    checkpoint_dir,
    file_sizes,
    finish_save,
)


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
