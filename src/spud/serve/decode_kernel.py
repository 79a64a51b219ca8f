"""The engine's one-token decode step on the CPU, with as few kernel launches as the maths allows.

At serving sizes a CPU decode step is mostly fixed per-op cost: the module forward of the micro
model (d 192, 6 layers) issues ~1,300 aten calls a token, and its 25 matmuls are only about half of
the step (docs/serving.md, "Decode overhead"). This module computes the same function
as `Transformer.forward_slots` + `logits` for T = 1 with a fraction of the calls:
- weights are copied once into the layout a one-row product is fastest against, (in, out)
  contiguous: MKL picks a ~2x faster kernel for it than for the training layout's transposed view;
- the RMSNorm gains that precede a projection are folded into its weights (norm(x)·g @ W =
  norm(x) @ (g·W)), the final norm's gain into the LM head;
- residual adds ride on the projection (`addmm`), rotary is one batched product, and no module,
  autocast or dtype bookkeeping runs per layer.

It is a second implementation of the llama block's decode arithmetic, so it is used only where it
is an exact re-statement of it: the `llama` block with a registered dense MLP and none of the
cross-layer options (`DecodeKernel.unsupported` says why not; everything else keeps the module
path). Results equal the module path up to float rounding (folded gains, fused adds, a different
BLAS kernel), like any other batch size already does; tests compare them by tolerance and greedy
tokens. The copies follow the model: parameter versions (moved by every in-place update:
optimizer steps, load_state_dict) and storages are checked each step and the copies rebuilt when
one changed, so an engine over a model that is being trained never decodes with stale weights.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from spud.model.blocks.llama import LlamaBlock
from spud.model.kv_cache import SlotKVCache
from spud.model.mlp import GELU, ReLU2, SwiGLU

_ACTIVATIONS = {SwiGLU: "swiglu", ReLU2: "relu2", GELU: "gelu"}


def rotation_matrices(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """(B, hd, hd) matrices R with x @ R = x·cos + swap_halves(x)·sin for rows of the rotary
    tables (B, hd; sin signed as in layers.Rotary): one batched product rotates every head of
    a row, where the elementwise form takes five kernels per layer."""
    rot = torch.diag_embed(cos)
    rows, cols = _swap_index(cos.shape[1])
    rot[:, rows, cols] = sin
    return rot


@functools.lru_cache(maxsize=8)
def _swap_index(hd: int) -> tuple[torch.Tensor, torch.Tensor]:
    # out[j] = x[j]·cos[j] + x[(j + hd/2) % hd]·sin[j]  ⇒  R[(j + hd/2) % hd, j] = sin[j]
    cols = torch.arange(hd)
    return (cols + hd // 2) % hd, cols


class DecodeKernel:
    """Decode-step logits for rows of a SlotKVCache, from the model's weights in decode layout."""

    def __init__(self, model) -> None:
        why = self.unsupported(model)
        if why is not None:
            raise ValueError(f"no decode kernel for this model: {why}")
        self.model = model
        cfg = model.cfg
        self.eps = cfg.norm_eps
        self.h, self.hkv, self.hd = cfg.n_heads, cfg.kv_heads, cfg.dim_head
        self.softcap = cfg.logit_softcap
        self.windows = [cfg.window_at(i) for i in range(cfg.n_layers)]
        self.act = _ACTIVATIONS[type(model.blocks[0].mlp)]
        self._params = list(model.parameters())
        self._key: list | None = None  # the weights are copied at the first step (see logits)

    @classmethod
    def of(cls, model) -> DecodeKernel | None:
        """A kernel for `model`, or None where it would not re-state the model (see unsupported)."""
        return cls(model) if cls.unsupported(model) is None else None

    @staticmethod
    def unsupported(model) -> str | None:
        """Why the kernel cannot stand in for this model's decode step, or None when it can."""
        cfg = model.cfg
        if model.embed.weight.device.type != "cpu":
            return "not on the CPU (other devices keep the module path and its fused kernels)"
        if cfg.block != "llama" or any(type(b) is not LlamaBlock for b in model.blocks):
            return f"block {cfg.block!r} (only the llama block is re-stated here)"
        if any(type(b.mlp) not in _ACTIVATIONS for b in model.blocks):
            return f"MLP {cfg.mlp!r} (mixtures of experts and plugin MLPs keep the module path)"
        for name in ("x0_mix", "unet_skips", "value_embeds"):
            if getattr(cfg, name):
                return f"model.{name} is on"
        if model.embed.weight.dtype != torch.float32:
            return f"weights in {model.embed.weight.dtype} (the kernel was measured in float32)"
        return None

    # ---------------------------------------------------------------------------- weights
    def _version_key(self) -> list:
        try:
            return [(p._version, p.data_ptr()) for p in self._params]
        except RuntimeError:  # inference tensors keep no version counter: storages only
            return [p.data_ptr() for p in self._params]

    @torch.no_grad()
    def _refresh(self) -> None:
        m = self.model
        self.embed = m.embed.weight.detach()
        self.layers = []
        for blk in m.blocks:
            a, mlp = blk.attn, blk.mlp
            g1, g2 = blk.attn_norm.weight, blk.mlp_norm.weight
            layer = {
                "qkv": (a.qkv.weight * g1).t().contiguous(),
                "proj": a.proj.weight.t().contiguous(),
                "qk_gain": None if a.q_norm is None else torch.cat(
                    (a.q_norm.weight.expand(self.h, -1), a.k_norm.weight.expand(self.hkv, -1))),
                "down": mlp.down.weight.t().contiguous(),
            }
            up = mlp.gate_up if isinstance(mlp, SwiGLU) else mlp.up
            layer["up"] = (up.weight * g2).t().contiguous()
            self.layers.append(layer)
        self.head = (m.lm_head.weight * m.norm.weight).t().contiguous()
        self._key = self._version_key()

    # ---------------------------------------------------------------------------- the step
    def logits(self, ids: torch.Tensor, cache: SlotKVCache, slots: list[int], starts: list[int]) -> torch.Tensor:
        """(B, V) logits of the next token for ids (B,), row i continuing slot slots[i] whose
        first starts[i] positions are cached; writes the rows' keys/values like forward_slots."""
        if self._version_key() != self._key:
            self._refresh()
        b = ids.shape[0]
        h, hkv, hd, eps = self.h, self.hkv, self.hd, self.eps
        d, n_qk = self.embed.shape[1], h + hkv
        cache.bind(slots, starts, 1)
        cos, sin = self.model.rotary.tables_at(cache.positions)  # (B, 1, 1, hd)
        rot = rotation_matrices(cos.view(b, hd), sin.view(b, hd))
        x = self.embed.index_select(0, ids)  # (B, d)
        for i, L in enumerate(self.layers):
            qkv = torch.mm(F.rms_norm(x, (d,), None, eps), L["qkv"]).view(b, n_qk + hkv, hd)
            qk = qkv[:, :n_qk]
            if L["qk_gain"] is not None:
                qk = F.rms_norm(qk, (hd,), None, eps) * L["qk_gain"]
            qk = torch.bmm(qk, rot)  # rotary, all heads of a row at once
            k, v = cache.update(i, qk[:, None, h:], qkv[:, None, n_qk:])  # (B, Hkv, L, hd)
            y = F.scaled_dot_product_attention(qk[:, :h, None], k, v, attn_mask=cache.mask_for(self.windows[i]),
                                               enable_gqa=hkv != h)
            x = torch.addmm(x, y.view(b, h * hd), L["proj"])
            u = torch.mm(F.rms_norm(x, (d,), None, eps), L["up"])
            if self.act == "swiglu":
                gate, up = u.chunk(2, dim=-1)
                u = F.silu(gate).mul_(up)
            elif self.act == "relu2":
                u = F.relu(u).square_()
            else:
                u = F.gelu(u, approximate="tanh")
            x = torch.addmm(x, u, L["down"])
        cache.advance(1)
        out = torch.mm(F.rms_norm(x, (d,), None, eps), self.head)
        if self.softcap is not None:
            out = torch.tanh(out / self.softcap) * self.softcap
        return out
