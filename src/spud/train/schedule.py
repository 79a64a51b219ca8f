"""Learning-rate schedules: linear warmup, then cosine decay, warmup-stable-decay, or constant.

A pure function of the step so that resuming needs no scheduler state beyond the step number.
"""

from __future__ import annotations

import math

from spud.config import RLConfig, TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based)."""
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    total, warm = cfg.max_steps, min(cfg.warmup_steps, cfg.max_steps)
    if step < warm:
        return peak * (step + 1) / warm
    return after_warmup(step, peak, floor, total, warm, cfg.schedule, cfg.decay_fraction)


def after_warmup(step: int, peak: float, floor: float, total: int, warm: int, schedule: str,
                 decay_fraction: float) -> float:
    """The schedule's LR at a step past the warm-up: shared by pretraining, SFT and RL."""
    if schedule == "constant":
        return peak
    if schedule == "cosine":
        progress = (step - warm) / max(1, total - warm)
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    # warmup-stable-decay: hold the peak, then decay linearly over the last decay_fraction of steps
    # (lets a run be extended or branched from the stable phase without restarting).
    decay_start = total - max(1, int(round(decay_fraction * total)))
    if step < decay_start:
        return peak
    progress = (step - decay_start) / max(1, total - decay_start)
    return peak + (floor - peak) * min(1.0, progress)


def rl_lr(r: RLConfig, step: int) -> float:
    """`spud rl`'s LR at optimizer step `step` (0-based): linear warm-up, then rl.schedule over
    rl.steps. The warm-up keeps RL's own expression, so that the constant default is bit for bit
    the schedule the earlier RL runs were measured with."""
    warm = min(r.warmup_steps, r.steps)
    if step < warm:
        return r.lr * min(1.0, (step + 1) / max(1, r.warmup_steps))
    return after_warmup(step, r.lr, r.lr * r.min_lr_ratio, r.steps, warm, r.schedule, r.decay_fraction)
