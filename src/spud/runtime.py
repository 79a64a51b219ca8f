"""Device choice, precision and reproducibility: the few facts every stage needs about where it runs.

fp32 on CPU (bf16 matmuls are very slow on most CPUs), bf16 autocast on CUDA (tensor cores), fp32
on MPS (bf16 autocast support there is partial). Seeding covers every RNG a run touches, and the
RNG states are saved in checkpoints so a resumed run draws the same dropout masks.
"""

from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch

from spud.errors import SpudError


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SpudError("train.device=cuda but no CUDA device is visible; use device=auto or cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise SpudError("train.device=mps but MPS is not available; use device=auto or cpu")
    return torch.device(name)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def compute_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def set_threads(n: int) -> int:
    """0 = one thread per core. Interop threads stay at 1: we never run ops concurrently."""
    n = n or os.cpu_count() or 1
    torch.set_num_threads(n)
    return n


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """All RNG states as tensors and plain containers, so they load with weights_only=True."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
