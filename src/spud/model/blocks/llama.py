"""The pre-norm sequential block of Llama, Qwen, Mistral, GPT-NeoX..."""

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


@register_block("llama")
class LlamaBlock(nn.Module):
    """x + attn(norm(x)), then x + mlp(norm(x)).

    Its weight names (attn_norm, attn.qkv, attn.proj, mlp_norm, mlp.gate_up, mlp.down) are what
    checkpoints and the Hugging Face export expect: keep them when changing this class.
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, layer_idx)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = build_mlp(cfg)
        # Residual dropout only when asked for: an identity module still costs a call per layer.
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else None

    @staticmethod
    def layer_key(cfg: ModelConfig, layer_idx: int) -> int:
        """The same parameters at every layer: flops.py builds one block to count them all."""
        return 0

    def forward(
        self, x: torch.Tensor, rotary: Rotary, kv_cache: KVCache | None = None, layer: int = 0,
        value_embed: torch.Tensor | None = None,
    ) -> torch.Tensor:
        a = self.attn(self.attn_norm(x), rotary, kv_cache, layer, value_embed)
        x = x + (self.drop(a) if self.drop is not None else a)
        m = self.mlp(self.mlp_norm(x))
        return x + (self.drop(m) if self.drop is not None else m)
