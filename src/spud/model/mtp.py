"""Multi-token prediction (`model.mtp_depth` > 0): an auxiliary training objective, after
DeepSeek-V3 (2024, §2.2), that also predicts the tokens 2 .. 1+depth positions ahead.

Head k (1-based) at position i combines the previous head's hidden state (the main model's for
k = 1) with the embedding of the token k positions ahead, which is known at training time:
    h_k[i] = Block_k(W_k · [norm(h_{k-1}[i]) ; norm(embed(t[i+k]))])
and predicts t[i+k+1] through the model's own final norm and LM head. The heads' loss, averaged
over depths and weighted by `model.mtp_weight`, is added to the training loss. They run only
in training forwards with targets: inference, evaluation, cached decoding and serving never
call them, so they cost nothing there (their weights are still in the checkpoint).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from spud.model.layers import RMSNorm, Rotary, linear

if TYPE_CHECKING:
    from spud.config import ModelConfig


class MTPHead(nn.Module):
    def __init__(self, cfg: ModelConfig, block_cls: type[nn.Module], depth: int) -> None:
        super().__init__()
        self.depth, self.d_model, self.vocab = depth, cfg.d_model, cfg.vocab_size
        self.hidden_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.embed_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.proj = linear(2 * cfg.d_model, cfg.d_model)
        # Numbered after the main stack, so pattern-driven choices (e.g. the attention window)
        # continue the model's layer pattern.
        self.block = block_cls(cfg, cfg.n_layers + depth - 1)

    training_only = True  # flops.py counts it in training FLOPs, not in inference FLOPs

    def flops_per_token(self, seq_len: int) -> float:
        """Per token of the main sequence: this head runs on seq_len - depth positions, through
        its projection, its block and the shared LM head."""
        from spud.model.flops import module_flops

        t = seq_len - self.depth
        if t <= 0:
            return 0.0
        per = module_flops(self.proj, t) + module_flops(self.block, t) + 2 * self.d_model * self.vocab
        return per * t / seq_len

    def forward(self, h: torch.Tensor, emb: torch.Tensor, rotary: Rotary) -> torch.Tensor:
        x = self.proj(torch.cat((self.hidden_norm(h), self.embed_norm(emb)), dim=-1))
        x = x.to(h.dtype)  # a residual stream in h's dtype, as the main model's (fp32 under autocast)
        return self.block(x, rotary, None, 0)


def mtp_inputs(targets: torch.Tensor, depth: int, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For head `depth` over positions [0, T - depth): the input token ids t[i+depth] (ignored
    ones replaced by 0) and the target ids t[i+depth+1], ignored where either is ignored.
    targets[:, j] is t[j+1], the usual next-token targets."""
    t = targets.shape[1]
    inp = targets[:, depth - 1 : t - 1]
    tgt = targets[:, depth:t]
    tgt = torch.where(inp == ignore_index, torch.full_like(tgt, ignore_index), tgt)
    return inp.clamp(min=0), tgt
