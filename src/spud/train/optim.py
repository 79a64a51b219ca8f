"""AdamW with weight decay only on matrices that are not embeddings.

Decaying norm gains, biases or the embedding table hurts small models (it shrinks what should be
free scale parameters), so they go in a no-decay group. Fused AdamW on CUDA and CPU (one kernel
per parameter group instead of a dozen elementwise passes), foreach elsewhere.
"""

from __future__ import annotations

import torch
from torch import nn

from spud.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    embedding_params = {
        id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)
    }
    decay, no_decay, seen = [], [], set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))  # tied weights appear twice; optimise them once
        (decay if p.dim() >= 2 and id(p) not in embedding_params else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    kwargs = {"fused": True} if device.type in ("cuda", "cpu") else {"foreach": True}
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        **kwargs,
    )
