"""Mixture-of-experts MLP (`model.moe_experts` > 0): top-k token routing over MLPs of type
`model.mlp`, with the Switch Transformer load-balancing loss.

Routing: a linear router gives each token a softmax over the experts; the token goes to its
`moe_top_k` most probable experts and their outputs are summed, each weighted by its (not
renormalised) probability, so the router learns from the LM loss even with top-1. No capacity
limit and no dropped tokens: a token's output depends on that token alone, which keeps cached
decoding, batched serving and the full forward equal.

Balancing (Fedus et al. 2021, "Switch Transformers"): aux = E · Σ_e f_e · P_e, with f_e the share
of routed (token, slot) pairs that went to expert e and P_e the mean router probability of e; it
is 1 when the load is uniform. The model adds `moe_aux_loss` × its mean over layers to the
training loss, and reports it and the tokens each expert received (see Transformer.train_stats).

Compute: tokens are sorted by expert and each expert runs one matmul chain on its rows, so a
token costs exactly top_k expert MLPs plus the router, whatever the balance; that is the count
flops.py reports (tests check it with FlopCounterMode). On the meta device (no data) the
N·top_k rows are split evenly instead: the same total rows, hence the same FLOPs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from spud.model.layers import linear
from spud.model.registry import get_mlp

if TYPE_CHECKING:
    from spud.config import ModelConfig


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_experts, self.top_k = cfg.moe_experts, cfg.moe_top_k
        self.router = linear(cfg.d_model, self.n_experts)
        expert = get_mlp(cfg.mlp)
        self.experts = nn.ModuleList(expert(cfg.d_model, cfg.hidden) for _ in range(self.n_experts))
        # Set by each training forward, read by the model: this layer's balancing loss and
        # tokens per expert (detached).
        self.aux_loss: torch.Tensor | None = None
        self.tokens_per_expert: torch.Tensor | None = None

    def flops_per_token(self, seq_len: int) -> float:
        """Router plus top_k expert MLPs (see module doc)."""
        from spud.model.flops import module_flops

        return 2 * self.router.weight.numel() + self.top_k * module_flops(self.experts[0], seq_len)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, d = x.shape, x.shape[-1]
        xf = x.reshape(-1, d)
        n, k, e = xf.shape[0], self.top_k, self.n_experts
        # Routing in fp32: under bf16 autocast near-ties would otherwise flip between a batched
        # and a cached forward of the same token.
        probs = self.router(xf).float().softmax(-1)  # (N, E)
        weight, chosen = probs.topk(k, dim=-1)  # (N, k)
        flat = chosen.reshape(-1)  # pair a = (token a // k, its (a % k)-th choice)
        order = flat.argsort(stable=True)  # pairs grouped by expert
        if xf.is_meta:
            sizes = [n * k // e + (i < n * k % e) for i in range(e)]
            counts = None
        else:
            counts = torch.bincount(flat, minlength=e)
            sizes = counts.tolist()
        token = order // k
        rows = xf[token].split(sizes)
        out = torch.cat([mlp(r) for mlp, r in zip(self.experts, rows, strict=True)])
        out = out * weight.reshape(-1)[order, None].to(out.dtype)
        # In the experts' output dtype (bf16 under autocast), as a dense MLP's output would be.
        y = out.new_zeros(xf.shape).index_add(0, token, out)
        if self.training and counts is not None:
            share = counts.float() / (n * k)
            self.aux_loss = e * (share * probs.mean(0)).sum()
            self.tokens_per_expert = counts.detach()
        return y.view(shape)
