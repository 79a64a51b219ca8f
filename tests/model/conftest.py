"""Shared fixtures for the model tests: tiny configs, deterministic seeds, fp32 everywhere."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from spud.config import ModelConfig


def _tiny(**kw) -> ModelConfig:
    base = dict(d_model=64, n_layers=2, n_heads=4, vocab_size=256, max_seq_len=64)
    return ModelConfig(**{**base, **kw})


@pytest.fixture
def tiny() -> Callable[..., ModelConfig]:
    """Factory for a 2-layer, d=64 config; keyword arguments override any field."""
    return _tiny


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
