"""Data-parallel `spud rl` under torchrun: rollouts split across ranks, one update everywhere.

    torchrun --nproc-per-node N -m spud rl RUN train.parallel=ddp [rl.key=value ...]

Every rank holds the whole model: RL samples from it whole (the serving engine), so sharding it
(FSDP) would buy nothing at the sizes RL runs here, and `train.parallel=fsdp` is refused.

- **Rollouts.** A round's completions are dealt round-robin to the ranks (completion j to rank
  j mod N), each rank samples its share through the engine with the seeds a single process gives
  those completions (indexed over the whole round) and runs their verifiers, and the results are
  gathered on every rank. So every rank holds the same rows and rewards, and dynamic sampling,
  advantages and the logged statistics are exactly a single process's — with the sampling and
  verifying split N ways, which is where RL spends its time.
- **Update.** The kept sequences' micro-batches are dealt round-robin to the ranks; each rank's loss
  is divided by the *whole* batch's completion-token count, so the sum of the ranks' gradients
  (one all-reduce of one flat buffer) is the single-process gradient. Every rank then clips and
  steps identically, so the weights stay equal without a broadcast (DDP's wrapper is not used: it
  would average, and it expects every rank to run the same number of forwards).
- **Evaluation** prompts are dealt the same way. Rank 0 writes metrics, config and checkpoints;
  every rank resumes from the same checkpoint. A stop (Ctrl-C, SIGTERM) seen by any rank stops all
  of them at the same step boundary.

`tests/posttrain/test_rl_dist.py` checks 1 process against 2 gloo ranks launched by torchrun:
the same rollouts, rewards and metrics, weights equal to ~1e-6.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from spud.errors import SpudError


class RLDist:
    """This process's place in an RL job: a single process (the common case) or rank r of N."""

    def __init__(self, train_cfg) -> None:
        from spud.train import distributed  # noqa: PLC0415

        self._d = distributed
        self.env = distributed.detect(train_cfg)
        if self.env.enabled and self.env.parallel != "ddp":
            raise SpudError(f"spud rl runs data parallel only: train.parallel={self.env.parallel} is not "
                            "supported; launch with train.parallel=ddp (each rank holds the whole model)")
        self._cpu = torch.device("cpu")
        distributed.init(self.env, self._cpu)  # gloo: RL runs on the CPU

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world(self) -> int:
        return self.env.world_size if self.env.enabled else 1

    @property
    def is_main(self) -> bool:
        return self.env.is_main

    def threads(self, threads: int) -> int:
        """torch threads for this rank: the config's, else the cores shared among local ranks."""
        return self._d.default_threads(self.env, threads)

    def deal(self, items: Sequence) -> list:
        """This rank's share of `items`: every world-th, from its rank."""
        return list(items[self.rank::self.world])

    def map(self, fn: Callable[[list], list], items: Sequence) -> list:
        """fn over all items, the work split across ranks: fn gets this rank's share (a list) and
        returns one result per item; every rank gets all results, in the items' order."""
        if self.world == 1:
            return fn(list(items))
        mine = self.deal(items)
        got = fn(mine) if mine else []
        parts: list[Any] = [None] * self.world
        try:
            dist.all_gather_object(parts, got)  # between this job's own ranks only
        except Exception as e:  # named, with the timeout to check
            raise self._d.collective_error(self.env, e) from e
        out: list[Any] = [None] * len(items)
        for r, part in enumerate(parts):
            out[r::self.world] = part
        return out

    def sum_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Sum the gradients over ranks in place (one all-reduce of one flat buffer). A parameter
        no rank has a gradient for stays None; a rank that ran no micro-batch contributes zeros."""
        if self.world == 1:
            return
        has = torch.tensor([0.0 if p.grad is None else 1.0 for p in params])
        dist.all_reduce(has, op=dist.ReduceOp.MAX)
        live = [p for p, h in zip(params, has.tolist()) if h]
        for p in live:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if not live:
            return
        flat = torch.cat([p.grad.reshape(-1) for p in live])
        dist.all_reduce(flat)
        offset = 0
        for p in live:
            n = p.grad.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n

    def all_sum(self, values: list[float]) -> list[float]:
        return self._d.all_sum(self.env, values, self._cpu)

    def any_true(self, flag: bool) -> bool:
        return self._d.any_true(self.env, flag, self._cpu)

    def barrier(self) -> None:
        self._d.barrier(self.env)

    def close(self) -> None:
        self._d.shutdown(self.env)


class NullLog:
    """The metrics log of a rank other than 0: the same records, written nowhere."""

    def write(self, kind: str, step: int, **fields: Any) -> dict:
        return {"kind": kind, "step": step, **fields}

    def close(self) -> None:
        pass
