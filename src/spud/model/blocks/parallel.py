"""The parallel block of GPT-J and PaLM."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from spud.model.layers import Attention, RMSNorm, Rotary
from spud.model.mlp import build_mlp
from spud.model.registry import register_block

if TYPE_CHECKING:
    from spud.config import ModelConfig
    from spud.model.transformer import KVCache


@register_block("parallel")
class ParallelBlock(nn.Module):
    """x + attn(norm(x)) + mlp(norm(x)) off one shared norm.

    Attention and MLP read the same normalised input, so a layer needs one norm instead of two
    and the two branches could run concurrently; quality is close to the sequential block.
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, layer_idx)
        self.mlp = build_mlp(cfg)
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else None

    @staticmethod
    def layer_key(cfg: ModelConfig, layer_idx: int) -> int:
        """The same parameters at every layer: flops.py builds one block to count them all."""
        return 0

    def forward(
        self, x: torch.Tensor, rotary: Rotary, kv_cache: KVCache | None = None, layer: int = 0,
        value_embed: torch.Tensor | None = None,
    ) -> torch.Tensor:
        h = self.norm(x)
        y = self.attn(h, rotary, kv_cache, layer, value_embed) + self.mlp(h)
        return x + (self.drop(y) if self.drop is not None else y)
