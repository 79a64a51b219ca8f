"""Fault handling: Ctrl-C/SIGTERM between steps, non-finite steps and rollback.

- graceful_stop(): the first SIGINT/SIGTERM sets a flag that the training loop checks between
  steps (it then saves a checkpoint and exits 130). A second Ctrl-C (SIGINT) aborts at once: a
  person asking twice. A repeated SIGTERM does not: supervisors repeat it (`timeout` signals the
  child and then its process group; Slurm and Kubernetes send SIGTERM, then SIGKILL after their
  grace period), and aborting would lose the checkpoint the first one asked for.
- A step whose global loss or gradient norm is not finite is skipped by the trainer (no optimizer
  update) and logged as {"kind": "event", "event": "nonfinite"}; after train.max_bad_steps such
  steps in a row, rollback() reloads the newest checkpoint (event "rollback").
- train.debug_nan_at_step (testing aid, never for real runs): the listed steps' loss is multiplied
  by NaN once each per process, poisoning the loss and every gradient of that step.

Crash safety of checkpoints themselves (temp dir + fsync + atomic rename, COMPLETE markers) lives
in checkpoint.py.
"""

from __future__ import annotations

import signal
from contextlib import contextmanager

from spud.errors import SpudError
from spud.train import checkpoint as ckpt_io


@contextmanager
def graceful_stop():
    """Yields a dict whose 'stop' turns True on the first SIGINT/SIGTERM (module doc)."""
    flag = {"stop": False}

    def handler(signum, frame):
        if flag["stop"] and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag["stop"] = True

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread: no handler, plain Ctrl-C behaviour
            pass
    try:
        yield flag
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


class NoLog:
    """metrics.jsonl stand-in for ranks other than 0."""

    def write(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def rollback(tr, log) -> None:
    """Reload weights and optimizer of the newest checkpoint; the loader keeps going, so the
    batches that went bad are not replayed. LR is scaled by train.rollback_lr_factor."""
    ckpt = ckpt_io.latest_checkpoint(tr.run_dir)
    bad = tr.bad_steps
    if ckpt is None:
        raise SpudError(f"{bad} non-finite steps in a row at step {tr.step} and no checkpoint to "
                        "roll back to; lower train.lr or check the data")
    state = ckpt_io.read_state(ckpt)
    tr._load_model_and_optimizer(ckpt)
    tr.step, tr.tokens_seen = state["step"], state["tokens_seen"]
    tr.lr_scale = state.get("lr_scale", 1.0) * tr.cfg.train.rollback_lr_factor
    tr.bad_steps = 0
    log.write("event", tr.step, event="rollback", checkpoint=ckpt.name, bad_steps=bad,
              lr_scale=tr.lr_scale)
    tr.console.print(f"[yellow]{bad} non-finite steps in a row: rolled back to {ckpt.name} "
                       f"(LR × {tr.lr_scale:g})")
