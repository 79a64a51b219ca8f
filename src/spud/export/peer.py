"""The Hugging Face twin of an in-memory Spud model: the native transformers class that
`spud export hf` would write (Llama, Qwen3, Arcee, Apertus; spud.export.arch), built in memory with
the identical weights. Benchmarks time it side by side with Spud, so "faster than transformers"
is always measured on the same function, whatever the recipe."""

from __future__ import annotations

from typing import Any

import torch

from spud.errors import SpudError
from spud.export.arch import hf_config, pick_arch, to_hf


def hf_twin(model: torch.nn.Module, **config_overrides: Any) -> torch.nn.Module:
    """A transformers model computing the same function as `model` (a Spud Transformer), in eval
    mode; `config_overrides` go to the HF config (e.g. attn_implementation="sdpa")."""
    try:
        import transformers
    except ImportError:
        raise SpudError("the Hugging Face comparison needs transformers: pip install 'spud[export]'") from None
    cfg = model.cfg
    arch = pick_arch(cfg)
    fields = hf_config(cfg, {})
    del fields["architectures"], fields["model_type"]
    hf_cfg = transformers.AutoConfig.for_model(arch.model_type, **{**fields, **config_overrides})
    peer = getattr(transformers, arch.hf_class)(hf_cfg)
    missing, unexpected = peer.load_state_dict(to_hf(model.state_dict(), cfg), strict=False)
    # a tied head is stored once (transformers re-ties it); anything else missing is a mapping bug
    missing = [k for k in missing if not (cfg.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise SpudError(f"HF twin: missing {missing}, unexpected {unexpected}")
    if cfg.tie_embeddings:
        peer.tie_weights()
    return peer.to(next(model.parameters()).dtype).eval()
