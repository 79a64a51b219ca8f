"""Learning-rate schedules: linear warmup, then cosine decay, warmup-stable-decay, or constant.

A pure function of the step so that resuming needs no scheduler state beyond the step number.
"""

from __future__ import annotations

import math

from spud.config import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based)."""
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    total, warm = cfg.max_steps, min(cfg.warmup_steps, cfg.max_steps)
    if step < warm:
        return peak * (step + 1) / warm
    if cfg.schedule == "constant":
        return peak
    if cfg.schedule == "cosine":
        progress = (step - warm) / max(1, total - warm)
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    # warmup-stable-decay: hold the peak, then decay linearly over the last decay_fraction of steps
    # (lets a run be extended or branched from the stable phase without restarting).
    decay_start = total - max(1, int(round(cfg.decay_fraction * total)))
    if step < decay_start:
        return peak
    progress = (step - decay_start) / max(1, total - decay_start)
    return peak + (floor - peak) * min(1.0, progress)
