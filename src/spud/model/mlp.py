"""The MLP types `model.mlp` chooses from, each one registered entry, and `build_mlp`, which
wraps them into a mixture of experts when `model.moe_experts` is set (moe.py).

An MLP class is built as `MLP(d_model, hidden)`. Two optional class attributes describe it to
the rest of spud without any table: `default_hidden(d_model)` (the width when `model.mlp_hidden`
is not given) and `hidden_activations` (hidden-sized tensors autograd keeps per token, for the
memory planner).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from spud.model.layers import ResidualLinear, linear
from spud.model.registry import get_mlp, register_mlp

if TYPE_CHECKING:
    from spud.config import ModelConfig


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


@register_mlp("swiglu")
class SwiGLU(nn.Module):
    """silu(x·Wg) ⊙ (x·Wu) · Wd, with Wg and Wu fused into one matmul (rows [gate | up])."""

    hidden_activations = 3  # gate, up, and their product

    @staticmethod
    def default_hidden(d_model: int) -> int:
        # 8/3·d keeps params equal to a 4·d two-matrix MLP; rounded for matmul efficiency.
        return _round_up(int(8 * d_model / 3), 64)

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.gate_up = linear(d_model, 2 * hidden)
        self.down = ResidualLinear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class _UpDownMLP(nn.Module):
    """act(x·Wu) · Wd: the two-matrix MLPs, differing only in the activation."""

    hidden_activations = 2  # pre-activation and activation

    @staticmethod
    def default_hidden(d_model: int) -> int:
        return 4 * d_model

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.up = linear(d_model, hidden)
        self.down = ResidualLinear(hidden, d_model, bias=False)

    @staticmethod
    def act(h: torch.Tensor) -> torch.Tensor:
        raise TypeError("subclasses define the activation")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(x)))


@register_mlp("relu2")
class ReLU2(_UpDownMLP):
    """relu(x·Wu)² · Wd (Primer / modded-nanoGPT)."""

    @staticmethod
    def act(h: torch.Tensor) -> torch.Tensor:
        return F.relu(h).square()


@register_mlp("gelu")
class GELU(_UpDownMLP):
    """gelu(x·Wu) · Wd with the tanh approximation, as in GPT-2 (the gelu presets mimic it)."""

    @staticmethod
    def act(h: torch.Tensor) -> torch.Tensor:
        return F.gelu(h, approximate="tanh")


def build_mlp(cfg: ModelConfig) -> nn.Module:
    """The block's MLP: `model.mlp` of width `cfg.hidden`, or a mixture of `model.moe_experts`
    such MLPs when that is set."""
    if cfg.moe_experts:
        from spud.model.moe import MoE

        return MoE(cfg)
    return get_mlp(cfg.mlp)(cfg.d_model, cfg.hidden)
