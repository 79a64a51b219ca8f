"""Data parallel training: launch detection, DDP / FSDP2 wrapping, and the few collectives the
trainer needs. Everything here is a no-op for a plain single process, so that path is unchanged.

Launch: `torchrun --nproc-per-node N -m spud train CONFIG --out RUN` sets RANK / WORLD_SIZE /
LOCAL_RANK (and MASTER_ADDR/PORT); `train.parallel` picks how the model is replicated:

- ddp:  every rank holds the whole model and optimizer; gradients are all-reduced once per
        optimizer step (`no_sync()` on all but the last micro-step of gradient accumulation).
- fsdp: FSDP2 `fully_shard` per transformer block, then the root: parameters, gradients and
        AdamW state are sharded over ranks (DTensors), weights are all-gathered per block for
        forward/backward, gradients reduce-scattered on the last micro-step only.

Backend nccl on CUDA (device cuda:LOCAL_RANK), gloo on CPU. `train.dist_timeout_s` bounds every
collective, so a dead or hung rank makes the others fail with a clear message instead of hanging.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from spud.config import TrainConfig
from spud.errors import SpudError


@dataclass
class DistEnv:
    parallel: str = "none"  # none | ddp | fsdp (the effective mode)
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    timeout_s: float = 300.0
    note: str = ""

    @property
    def enabled(self) -> bool:
        return self.parallel != "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def detect(t: TrainConfig) -> DistEnv:
    """What this process is: a single process, or rank r of a torchrun job (see module doc)."""
    if not launched_by_torchrun():
        note = ""
        if t.parallel != "none":
            note = (f"train.parallel={t.parallel} but not launched with torchrun: training as a single "
                    "process (launch with `torchrun --nproc-per-node N -m spud train ...` to use N ranks)")
        return DistEnv(timeout_s=t.dist_timeout_s, note=note)
    world = int(os.environ["WORLD_SIZE"])
    rank, local = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if t.parallel == "none":
        if world == 1:
            return DistEnv(timeout_s=t.dist_timeout_s)
        raise SpudError(
            f"launched by torchrun with {world} ranks but train.parallel=none; set train.parallel=ddp "
            "(replicate the model) or train.parallel=fsdp (shard it), e.g. `... train.parallel=ddp`"
        )
    return DistEnv(t.parallel, rank, world, local, t.dist_timeout_s)


def init(env: DistEnv, device: torch.device) -> torch.device:
    """Join the process group; returns this rank's device (cuda:LOCAL_RANK on CUDA)."""
    if not env.enabled:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type not in ("cuda", "cpu"):
        raise SpudError(f"train.parallel={env.parallel} needs CUDA or CPU, not {device.type}")
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=env.timeout_s))
    return device


def shutdown(env: DistEnv) -> None:
    if env.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()


def collective_error(env: DistEnv, err: BaseException) -> SpudError:
    return SpudError(
        f"rank {env.rank}/{env.world_size}: a collective failed or timed out "
        f"(train.dist_timeout_s={env.timeout_s:g}); another rank probably died or hung - see its "
        f"output above. Resume with --resume once fixed. ({type(err).__name__}: {str(err)[:300]})"
    )


# ------------------------------------------------------------------------------- model wrapping
def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in backward (torch.utils.checkpoint, non-reentrant).

    The block's own forward is replaced on the instance, so parameter names and the state dict are
    unchanged, and FSDP's per-block hooks (added later) wrap the checkpointed forward.
    """
    from torch.utils.checkpoint import checkpoint

    for block in model.blocks:
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            if not torch.is_grad_enabled():  # eval / sampling: nothing to save
                return _inner(*args, **kwargs)
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = functools.wraps(inner)(forward)


def wrap(model: nn.Module, env: DistEnv, device: torch.device, mixed_precision: bool) -> nn.Module:
    """Returns the module to call for training steps. For fsdp, `model` itself is sharded in place
    (its parameters become DTensors); for ddp it is wrapped and stays the plain module."""
    if env.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if device.type == "cuda" else None
        # A VLM's vision tower gets no gradient from a text-only batch (spud vlm mixes them in),
        # which plain DDP reports as an error; finding unused parameters costs a graph walk per
        # step, so only VLMs pay it.
        unused = getattr(getattr(model, "cfg", None), "vision", None) is not None
        return DDP(model, device_ids=ids, find_unused_parameters=unused)
    if env.parallel == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(device.type, (env.world_size,))
        kw = {"mesh": mesh}
        if mixed_precision and device.type == "cuda":
            kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for block in model.blocks:
            fully_shard(block, **kw)
        fully_shard(model, **kw)  # the root: embedding (tied LM head) and final norm
        return model
    return model


def sync_context(env: DistEnv, step_model: nn.Module, model: nn.Module, last: bool):
    """Context for one micro-step: gradients are synchronised only on the last one."""
    if env.parallel == "ddp" and not last:
        target = getattr(step_model, "_orig_mod", step_model)  # under torch.compile
        return target.no_sync()
    if env.parallel == "fsdp":
        model.set_requires_gradient_sync(last)
    return contextlib.nullcontext()


# ------------------------------------------------------------------------------- collectives
def mean(env: DistEnv, value: float, device: torch.device) -> float:
    """Global mean of a per-rank scalar (identity for a single process)."""
    if not env.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / env.world_size


def all_sum(env: DistEnv, values: list[float], device: torch.device) -> list[float]:
    if not env.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def any_true(env: DistEnv, flag: bool, device: torch.device) -> bool:
    """True on every rank if it is True on any (e.g. a Ctrl-C that reached only some ranks)."""
    if not env.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def clip_grad_norm(env: DistEnv, model: nn.Module, max_norm: float) -> float:
    """Clip to a global total L2 norm; returns the norm before clipping (inf/nan if non-finite).

    Single process and DDP (gradients already identical on every rank) use torch's own
    clip_grad_norm_. Under FSDP each rank holds a shard of every gradient (a DTensor): the squares
    of the local shards are summed, all-reduced, and the root of that is the global norm.
    """
    if env.parallel != "fsdp":
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item()
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in model.parameters() if p.grad is not None]
    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    dev = local[0].device if local else torch.device("cpu")
    sq = torch.zeros((), dtype=torch.float32, device=dev)
    for g in local:
        sq += g.detach().float().pow(2).sum()
    dist.all_reduce(sq)
    total = sq.sqrt().item()
    if math.isfinite(total) and max_norm < float("inf"):
        coef = max_norm / (total + 1e-6)
        if coef < 1.0:
            for g in local:
                g.mul_(coef)
    return total


# ------------------------------------------------------------------------------- memory
def memory_plan(cfg, env: DistEnv, device: torch.device, micro_batch: int, seq_len: int) -> tuple[str, str | None]:
    """(one-line per-rank estimate, refusal message or None). Refuses only on CUDA, where the
    device's memory is known; the estimate follows spud.model.memory's conventions."""
    from spud.model.memory import USABLE_FRACTION, training_memory

    t = cfg.train
    precision = "bf16" if device.type == "cuda" else "fp32"
    fsdp = env.world_size if env.parallel == "fsdp" else 1
    est = training_memory(cfg.model, micro_batch, seq_len, precision, fsdp, t.activation_checkpointing,
                          optimizer=t.optimizer)
    gib = 2**30

    def f(x: float) -> str:
        return f"{x / gib:.2f} GiB" if x >= 0.1 * gib else f"{x / 2**20:.1f} MiB"

    line = (f"memory per rank (estimate, {precision}{', FSDP/' + str(fsdp) if fsdp > 1 else ''}"
            f"{', act. ckpt' if t.activation_checkpointing else ''}): params {f(est.weights)} · grads "
            f"{f(est.gradients)} · optimizer {f(est.optimizer)} · activations {f(est.activations)} "
            f"(micro-batch {micro_batch}×{seq_len}) = {f(est.total)}")
    if device.type != "cuda":
        return line, None
    have = torch.cuda.get_device_properties(device).total_memory
    if est.total <= USABLE_FRACTION * have:
        return line, None
    tips = [f"lower train.micro_batch_size (now {micro_batch}; gradient accumulation keeps "
            "train.tokens_per_step)"]
    if not t.activation_checkpointing:
        tips.append("set train.activation_checkpointing=true")
    if env.parallel != "fsdp":
        tips.append("shard with train.parallel=fsdp under torchrun (more GPUs → less state per GPU)")
    return line, (f"this config needs about {f(est.total)} per GPU but {device} has {f(have)} "
                  f"({USABLE_FRACTION:.0%} usable): " + "; ".join(tips))


def default_threads(env: DistEnv, threads: int) -> int:
    """CPU threads per rank: the config's, else OMP_NUM_THREADS, else cores / ranks on this node."""
    if threads or not env.enabled:
        return threads
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return int(os.environ["OMP_NUM_THREADS"])
    local = int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size))
    return max(1, (os.cpu_count() or 1) // local)
