"""Getting a model out of (and into) Spud: consolidated weights (weights.py), Hugging Face
transformers export and import (hf.py, hf_import.py, arch.py), GGUF for llama.cpp (gguf.py),
the model card (model_card.py). Submodules import torch; this package itself stays light so the
CLI can register its verbs without loading them."""

from __future__ import annotations


def __getattr__(name: str):
    if name == "export_weights":  # `from spud.export import export_weights` (spud export-weights)
        from spud.export.weights import export_weights

        return export_weights
    raise AttributeError(f"module 'spud.export' has no attribute {name!r}")
