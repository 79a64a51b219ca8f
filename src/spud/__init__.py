"""Spud: a foundation-model factory — data mix, tokenizer, pretraining, sampling, from one CLI."""

__version__ = "0.1.0"

from spud.errors import SpudError  # noqa: E402

__all__ = ["SpudError", "__version__"]
