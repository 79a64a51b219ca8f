"""Building blocks of the decoder: RMSNorm, rotary embeddings, attention (MLPs: mlp.py, moe.py).

Design notes (CPU fp32 eager throughput drives most choices):
- Projections are fused: one Linear for q/k/v and one for the SwiGLU gate/up pair. Fewer, larger
  matmuls run closer to BLAS peak, and the split afterwards is a free view. The export
  (spud.export.arch.to_hf) splits them back so weights stay interchangeable with Hugging Face.
- Rotary uses the half-rotation ("rotate_half") convention of HF Llama for the same reason, and is
  applied to q and k in a single call because they sit next to each other in the fused output.
- No biases anywhere, and no `.contiguous()` calls: SDPA's CPU/GPU kernels accept the strided
  (B, H, T, hd) views of the (B, T, H, hd) projection output, and hand back an output whose
  (B, T, H*hd) view is contiguous, so the output projection needs no copy either.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from spud.errors import SpudError

if TYPE_CHECKING:  # only for annotations; avoids an import cycle with transformer.py
    from spud.config import ModelConfig
    from spud.model.transformer import KVCache, SlotKVCache


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learnable gain (no bias, no mean subtraction)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.rms_norm runs torch's fused kernel where one exists (CUDA) and its composite
        # elsewhere; hand-written pow/mean/rsqrt would forgo the fused path everywhere.
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class ResidualLinear(nn.Linear):
    """A Linear that writes into the residual stream (attention out, MLP down).

    The type is only a tag: the model's init finds these and scales their std by
    1/sqrt(2·n_layers), so the residual stream's variance does not grow with depth.
    """


def linear(d_in: int, d_out: int) -> nn.Linear:
    return nn.Linear(d_in, d_out, bias=False)


@functools.lru_cache(maxsize=16)
def _rotary_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """CPU (T, 1, hd) cos and signed-sin tables. Cached, and computed on the CPU whatever the
    default device: flops.py builds many models on the meta device, where these would cost
    more than the rest of the model. Never modified in place (buffers are replaced by .to())."""
    # float64 for the angles so long positions do not lose precision before cos/sin.
    cpu = {"dtype": torch.float64, "device": "cpu"}
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, **cpu) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, **cpu), inv_freq)
    cos, sin = angles.cos(), angles.sin()
    # Shape (T, 1, hd): broadcasts over the head axis of (B, T, H, hd) activations.
    return torch.cat((cos, cos), -1).float()[:, None], torch.cat((-sin, sin), -1).float()[:, None]


class Rotary(nn.Module):
    """Rotary position embedding with precomputed cos/sin tables (half-rotation convention).

    HF Llama computes x·cos + rotate_half(x)·sin with rotate_half(x) = (-x2, x1). Folding the
    sign into the table (sin_signed = (-sin, sin)) leaves only a half swap (x2, x1): three
    kernels (cat, mul, addcmul) instead of five, with the same result up to float rounding.
    Buffers are non-persistent: they are a pure function of the config, so checkpoints stay
    small and a changed max_seq_len never conflicts with a saved table.
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float) -> None:
        super().__init__()
        self.max_seq_len = max_seq_len
        cos, sin = _rotary_tables(head_dim, max_seq_len, theta)
        dev = torch.get_default_device()  # meta while flops.py counts
        self.register_buffer("cos", cos.to(dev), persistent=False)
        self.register_buffer("sin", sin.to(dev), persistent=False)

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """Rotate x of shape (B, T, H, head_dim) for positions offset .. offset+T-1."""
        t = x.shape[1]
        if offset + t > self.max_seq_len:
            raise SpudError(
                f"sequence position {offset + t} exceeds model.max_seq_len={self.max_seq_len}; "
                "raise model.max_seq_len or use shorter sequences / generations"
            )
        cos = self.cos[offset : offset + t].to(x.dtype)
        sin = self.sin[offset : offset + t].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.addcmul(x * cos, torch.cat((x2, x1), dim=-1), sin)

    def at(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate x (B, T, H, head_dim) where row b, step t sits at positions[b, t].

        Slot decoding batches sequences of different lengths, so each row needs its own
        offset: the tables are gathered per position instead of sliced. Same arithmetic as
        `forward`, so a row gets bit-identical values either way. Callers bound-check the
        positions (SlotKVCache.bind does it on the host, avoiding a device sync here).
        """
        cos, sin = self.tables_at(positions)
        return self.apply(x, cos.to(x.dtype), sin.to(x.dtype))

    def tables_at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin rows (B, T, 1, hd) for positions (B, T); broadcast over heads."""
        return self.cos[positions], self.sin[positions]

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.addcmul(x * cos, torch.cat((x2, x1), dim=-1), sin)


def causal_mask(offset: int, t: int, window: int | None, device) -> torch.Tensor:
    """Boolean (t, offset + t) mask: query i (at position offset + i) sees key j when
    j <= offset + i and, with a window, offset + i - j < window."""
    kpos = torch.arange(offset + t, device=device)
    qpos = torch.arange(offset, offset + t, device=device)[:, None]
    mask = kpos[None, :] <= qpos
    if window is not None:
        mask &= kpos[None, :] > qpos - window
    return mask


class Attention(nn.Module):
    """Causal self-attention with grouped KV heads (MHA / GQA / MQA), optional QK-norm, an
    optional sliding window (`model.attn_pattern` / `attn_window`: this layer's queries see only
    the last `window` positions) and optional value embeddings added to the values."""

    def __init__(self, cfg: ModelConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.kv_heads
        self.head_dim = cfg.dim_head
        self.dropout = cfg.dropout
        self.window = cfg.window_at(layer_idx)  # None = global (full causal) attention
        # Fused projection, rows ordered [q heads | k heads | v heads].
        self.qkv = linear(cfg.d_model, (self.n_heads + 2 * self.n_kv_heads) * self.head_dim)
        self.proj = ResidualLinear(self.n_heads * self.head_dim, cfg.d_model, bias=False)
        # QK-norm (one gain per head_dim, shared by heads) keeps attention logits bounded,
        # which stabilises training at high learning rates.
        self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else None

    def flops_per_token(self, seq_len: int) -> int:
        """Projections, plus QKᵀ and AV over the full seq_len square for every query head
        (flops.py convention; a window masks that square, it does not shrink it)."""
        return 2 * (self.qkv.weight.numel() + self.proj.weight.numel()) + 4 * seq_len * self.head_dim * self.n_heads

    def forward(
        self,
        x: torch.Tensor,
        rotary: Rotary,
        kv_cache: KVCache | None = None,
        layer: int = 0,
        value_embed: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """value_embed: (B, T, n_kv_heads·head_dim) added to the values (model.value_embeds)."""
        if kv_cache is not None and kv_cache.per_row:
            return self._forward_slots(x, rotary, kv_cache, layer, value_embed)
        b, t, _ = x.shape
        h, hkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = self.qkv(x).view(b, t, h + 2 * hkv, hd)
        offset = kv_cache.pos if kv_cache is not None else 0
        # split (not slicing): its backward is one cat into the fused gradient, where slices
        # would each allocate a zero-filled full-size gradient and add them up.
        if self.q_norm is not None:
            q, k, v = qkv.split((h, hkv, hkv), dim=2)
            q, k = rotary(self.q_norm(q), offset), rotary(self.k_norm(k), offset)
        else:
            # q and k are adjacent in the fused output: rotate both with one set of kernels.
            qk, v = qkv.split((h + hkv, hkv), dim=2)
            q, k = rotary(qk, offset).split((h, hkv), dim=2)
        if value_embed is not None:
            v = v + value_embed.view(b, t, hkv, hd).to(v.dtype)
        # (B, T, H, hd) -> (B, H, T, hd) as views; SDPA handles the strides.
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

        mask, causal = None, True
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)
            # A cache made in the weights' dtype may meet bf16 activations under autocast.
            k, v = k.to(q.dtype), v.to(q.dtype)
            if offset > 0:
                causal = False
                # chunked prefill: query i sees keys up to offset + i. A single new token sees
                # every cached key, so it needs no mask unless a window hides the oldest ones.
                if t > 1 or (self.window is not None and offset + t > self.window):
                    mask = causal_mask(offset, t, self.window, x.device)
        if causal and self.window is not None and t > self.window:
            mask, causal = causal_mask(0, t, self.window, x.device), False

        drop = self.dropout if self.training else 0.0
        # enable_gqa (torch >= 2.5, spud's minimum) broadcasts each KV head over its group of
        # query heads inside the kernel, so GQA/MQA never materialise repeated keys/values.
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=drop, is_causal=causal and mask is None,
            enable_gqa=hkv != h,
        )
        # SDPA returns (B, H, T, hd) laid out as (B, T, H, hd) on the fused kernels; reshape
        # copies only when a backend returns another layout.
        return self.proj(y.transpose(1, 2).reshape(b, t, h * hd))

    def _qk_normed(self, qk: torch.Tensor) -> torch.Tensor:
        """q_norm on the query heads and k_norm on the key heads of qk (B, T, h + hkv, hd).

        Decoding is a few-microsecond op per kernel at serving sizes, so one normalisation over
        all heads times a per-head gain (the two weights stacked, cached while they are
        unchanged) replaces two rms_norm calls: torch's rms_norm computes x·rsqrt(mean(x²)+eps)
        and then multiplies by the weight, so the values are bit-identical (tested). That is
        the CPU composite; other devices may fuse the weight into their kernel, so they keep
        the two calls, as does autograd (nobody serves that way; the weights need gradients)."""
        h = self.n_heads
        qw, kw = self.q_norm.weight, self.k_norm.weight
        if (qk.device.type != "cpu" or self.q_norm.eps != self.k_norm.eps
                or (torch.is_grad_enabled() and (qw.requires_grad or kw.requires_grad))):
            return torch.cat((self.q_norm(qk[:, :, :h]), self.k_norm(qk[:, :, h:])), dim=2)
        if qw.is_inference() or kw.is_inference():
            # weights made under inference_mode keep no version counter: no safe cache key
            gain = torch.cat((qw.expand(h, -1), kw.expand(self.n_kv_heads, -1)))
        else:
            # parameter versions move on every in-place update (optimizer step,
            # load_state_dict), data pointers on .to(); either one rebuilds the stacked gain
            key = (qw._version, kw._version, qw.data_ptr(), kw.data_ptr(), qw.dtype)
            cached = self.__dict__.get("_qk_gain")
            if cached is None or cached[0] != key:
                stacked = torch.cat((qw.detach().expand(h, -1), kw.detach().expand(self.n_kv_heads, -1)))
                self.__dict__["_qk_gain"] = cached = (key, stacked)
            gain = cached[1]
        return F.rms_norm(qk, (self.head_dim,), None, self.q_norm.eps) * gain

    def _forward_slots(
        self, x: torch.Tensor, rotary: Rotary, cache: SlotKVCache, layer: int,
        value_embed: torch.Tensor | None,
    ) -> torch.Tensor:
        """Attention for rows that live in different slots of a SlotKVCache, each with its own
        length. Kept apart from `forward` so the training / single-sequence path stays exactly
        as it was; the projections, norms and rotary arithmetic are the same per row."""
        b, t, _ = x.shape
        h, hkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = self.qkv(x).view(b, t, h + 2 * hkv, hd)
        qk, v = qkv.split((h + hkv, hkv), dim=2)
        if self.q_norm is not None:
            qk = self._qk_normed(qk)
        # q and k rotated together (cache.rotary_at = rotary.at(·, cache.positions), its tables
        # gathered once per forward): the same arithmetic per element as rotating each apart
        q, k = cache.rotary_at(rotary, qk).split((h, hkv), dim=2)
        if value_embed is not None:
            v = v + value_embed.view(b, t, hkv, hd).to(v.dtype)
        k, v = cache.update(layer, k, v)  # takes (B, T, Hkv, hd), returns (B, Hkv, L, hd)
        k, v = k.to(q.dtype), v.to(q.dtype)
        # The boolean mask (B, 1, T, L) hides keys after each query's position, which covers
        # both causality and whatever a slot's previous occupant left beyond this row's length,
        # and, for a windowed layer, keys older than the window. It is None when it would be
        # all True (one new token per row, all rows equally long, no window cut).
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k, v, attn_mask=cache.mask_for(self.window), enable_gqa=hkv != h,
        )
        return self.proj(y.transpose(1, 2).reshape(b, t, h * hd))


def init_weights(model: nn.Module, std: float, n_layers: int, zero_residual: bool = False) -> None:
    """Normal(std) for every matmul / embedding weight; residual outputs get std/sqrt(2·L), or
    zeros with zero_residual (`model.zero_init_residual`).

    The depth scaling (GPT-2, Megatron) keeps the residual stream's variance at init roughly
    independent of depth: each of the 2·L residual branches adds variance ∝ std². Zero-init
    (modded-nanogpt, nanochat) goes further: every block starts as the identity, so the model
    starts as embedding → LM head and each branch grows from zero as its gradient asks; the
    branch's input projections still get gradient, because its output weight's gradient
    (output grad × branch activation) is not zero.
    """
    out_std = std / math.sqrt(2 * n_layers)
    for m in model.modules():
        if isinstance(m, ResidualLinear):
            if zero_residual:
                nn.init.zeros_(m.weight)
            else:
                nn.init.normal_(m.weight, mean=0.0, std=out_std)
        elif isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=std)
        elif isinstance(m, RMSNorm):
            m.reset_parameters()


# ------------------------------------------------------------------- fused LM head + loss
def linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    softcap: float | None = None,
    ignore_index: int = -1,
) -> torch.Tensor:
    """mean cross_entropy(softcap(h @ weight.T), targets) without materialising all logits.

    h: (N, d), weight: (V, d), targets: (N,). Same value and gradients as the plain
    F.cross_entropy path (tests check both), but logits exist one chunk of rows at a time and
    their gradient (softmax - onehot) is formed in place and immediately contracted into the
    gradients of h and weight, during the forward. That removes the separate log-softmax,
    its backward, the zero-filled NLL gradient and three full (N, V) buffers: on CPU the loss
    becomes ~matmul-bound, and on any device peak memory drops by ~2·N·V floats.
    """
    need_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    return _LinearCrossEntropy.apply(h, weight, targets, softcap, ignore_index, need_grad)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, softcap, ignore_index, need_grad):  # type: ignore[override]
        dev = h.device.type
        # Under autocast, run the matmuls in the autocast dtype (as nn.Linear would) and the
        # softmax in fp32; autocast itself is switched off so out= buffers keep their dtype.
        # (meta tensors, as flops.py counts, have no autocast at all)
        amp = torch.amp.is_autocast_available(dev)
        mm_dtype = torch.get_autocast_dtype(dev) if amp and torch.is_autocast_enabled(dev) else h.dtype
        n, v = h.shape[0], weight.shape[0]
        # ~8 MB of fp32 logits per chunk on CPU stays cache-friendly and is reused across
        # chunks; accelerators get bigger chunks to keep per-chunk launch overhead small.
        budget = 2**21 if dev == "cpu" else 2**26
        rows = max(1, min(n, budget // v))
        with torch.autocast(dev, enabled=False) if amp else contextlib.nullcontext():
            hm, wm = h.to(mm_dtype), weight.to(mm_dtype)
            valid = targets != ignore_index
            n_valid = valid.sum()
            tgt = torch.where(valid, targets, 0)[:, None]
            scale = valid.float() / n_valid  # d(mean loss)/d(row loss); 0 on ignored rows
            loss = torch.zeros((), dtype=torch.float32, device=h.device)
            grad_h = torch.empty_like(hm) if need_grad and h.requires_grad else None
            grad_w = (torch.zeros(weight.shape, dtype=torch.float32, device=h.device)
                      if need_grad and weight.requires_grad else None)
            buf = torch.empty((rows, v), dtype=torch.float32, device=h.device)
            for s in range(0, n, rows):
                e = min(n, s + rows)
                hc = hm[s:e]
                if mm_dtype == torch.float32:
                    z = torch.mm(hc, wm.t(), out=buf[: e - s])
                else:
                    z = buf[: e - s].copy_(torch.mm(hc, wm.t()))
                t = None
                if softcap is not None:
                    z.div_(softcap).tanh_()
                    t = z.clone() if need_grad else None  # tanh saved for its derivative
                    z.mul_(softcap)
                zmax = z.amax(dim=1, keepdim=True)
                z_tgt = z.gather(1, tgt[s:e])
                p = z.sub_(zmax).exp_()  # unnormalised softmax, in place
                denom = p.sum(dim=1, keepdim=True)
                row_loss = zmax + denom.log() - z_tgt
                loss += (row_loss.squeeze(1) * valid[s:e]).sum()
                if not need_grad:
                    continue
                # d loss / d logits = scale · (softmax - onehot), formed in place in p.
                p.mul_(scale[s:e, None] / denom)
                p.scatter_add_(1, tgt[s:e], -scale[s:e, None])
                if t is not None:
                    p.mul_(1 - t * t)  # through cap·tanh(z/cap)
                pm = p.to(mm_dtype)
                if grad_h is not None:
                    torch.mm(pm, wm, out=grad_h[s:e])
                if grad_w is not None:
                    # addmm with out= (not addmm_): same BLAS call, but visible to
                    # FlopCounterMode, which has no formula for the in-place variant.
                    torch.addmm(grad_w, pm.t().float(), hc.float(), out=grad_w)
            loss = loss / n_valid
        ctx.save_for_backward(
            grad_h if grad_h is not None else torch.empty(0),
            grad_w if grad_w is not None else torch.empty(0),
        )
        ctx.has = (grad_h is not None, grad_w is not None)
        ctx.dtypes = (h.dtype, weight.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        grad_h, grad_w = ctx.saved_tensors
        gh = (grad_h * grad_out).to(ctx.dtypes[0]) if ctx.has[0] else None
        gw = (grad_w * grad_out).to(ctx.dtypes[1]) if ctx.has[1] else None
        return gh, gw, None, None, None, None
