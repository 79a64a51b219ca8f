"""Registry of named transformer block types.

`ModelConfig.block` names an entry here. Adding an architecture = writing one block class and
decorating it with `@register_block("name")`; the Transformer shell (embedding, final norm, LM
head, KV cache, init) is shared by all blocks.

A block class is constructed as `Block(cfg, layer_idx)` and called as
`block(x, rotary, kv_cache, layer_idx) -> x` on the residual stream x of shape (B, T, d_model).
Blocks tag the Linears that write into the residual stream as `layers.ResidualLinear` so the
shared init can depth-scale them. If a block's parameter count differs from the "llama" block's
(other than through norms), teach `flops.param_counts` about it too.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from torch import nn

from spud.errors import SpudError
from spud.model.layers import Attention, RMSNorm, Rotary, build_mlp

if TYPE_CHECKING:
    import torch

    from spud.config import ModelConfig
    from spud.model.transformer import KVCache, Transformer

BLOCKS: dict[str, type[nn.Module]] = {}

B = TypeVar("B", bound=type[nn.Module])


def register_block(name: str) -> Callable[[B], B]:
    """Class decorator: make a block type available as `model.block: <name>`."""

    def deco(cls: B) -> B:
        if name in BLOCKS and BLOCKS[name] is not cls:
            raise SpudError(f"block type {name!r} is already registered by {BLOCKS[name]!r}")
        BLOCKS[name] = cls
        return cls

    return deco


def get_block(name: str) -> type[nn.Module]:
    if name not in BLOCKS:
        close = difflib.get_close_matches(name, list(BLOCKS), n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise SpudError(
            f"unknown model.block {name!r}{hint}; known block types: {', '.join(sorted(BLOCKS))}"
        )
    return BLOCKS[name]


def build_model(cfg: ModelConfig) -> Transformer:
    """Build the model a config describes (validates the block name first)."""
    get_block(cfg.block)
    # Imported here because transformer.py imports this module to look blocks up.
    from spud.model.transformer import Transformer

    return Transformer(cfg)


@register_block("llama")
class LlamaBlock(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)) (Llama, GPT-NeoX...)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = build_mlp(cfg)
        # Residual dropout only when asked for: an identity module still costs a call per layer.
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else None

    def forward(
        self, x: torch.Tensor, rotary: Rotary, kv_cache: KVCache | None = None, layer: int = 0
    ) -> torch.Tensor:
        a = self.attn(self.attn_norm(x), rotary, kv_cache, layer)
        x = x + (self.drop(a) if self.drop is not None else a)
        m = self.mlp(self.mlp_norm(x))
        return x + (self.drop(m) if self.drop is not None else m)


@register_block("parallel")
class ParallelBlock(nn.Module):
    """x + attn(norm(x)) + mlp(norm(x)) off one shared norm (GPT-J, PaLM).

    Attention and MLP read the same normalised input, so a layer needs one norm instead of two
    and the two branches could run concurrently; quality is close to the sequential block.
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp = build_mlp(cfg)
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else None

    def forward(
        self, x: torch.Tensor, rotary: Rotary, kv_cache: KVCache | None = None, layer: int = 0
    ) -> torch.Tensor:
        h = self.norm(x)
        y = self.attn(h, rotary, kv_cache, layer) + self.mlp(h)
        return x + (self.drop(y) if self.drop is not None else y)
