"""The engine's one-token decode step on the CPU, in numpy, with as few calls as the maths allows.

At serving sizes a CPU decode step is mostly fixed per-call cost: the module forward of the micro
model (d 192, 6 layers) issues ~1,300 aten calls a token, and even a lean torch re-statement of it
(~20 calls a layer) spent half its time outside the matmuls, at 3-10 us per torch call. This
module computes the same function as `Transformer.forward_slots` + `logits` for T = 1 in numpy on
zero-copy views: a numpy call costs ~0.4-1 us, and numpy's BLAS (OpenBLAS in numpy's wheels) runs
the one-row products about twice as fast as torch's MKL on the AMD EPYC we measure on
(docs/serving.md, "The decode kernel"). Also:
- weights are copied once into (in, out)-contiguous float32 arrays, the layout a one-row product
  reads in order;
- the RMSNorm gains that precede a projection are folded into its weights (norm(x)·g @ W =
  norm(x) @ (g·W)), the final norm's gain into the LM head;
- the KV cache is written and read through numpy views of its own memory
  (SlotKVCache.update_arrays), attention is written out for one query per row;
- numpy's BLAS gets torch's thread count, so `--threads` means the same for both.

It is a second implementation of the llama block's decode arithmetic, so it is used only where it
is an exact re-statement of it: the `llama` block with a registered dense MLP and none of the
cross-layer options, fp32 on the CPU (`DecodeKernel.unsupported` says why not; everything else
keeps the module path). Results equal the module path up to float rounding (folded gains,
another BLAS, sigmoid written through tanh), like any other batch size already does; tests
compare them by tolerance and greedy tokens. The copies follow the model: parameter versions
(moved by every in-place update: optimizer steps, load_state_dict) and storages are checked each
step and the copies rebuilt when one changed, so an engine over a model that is being trained
never decodes with stale weights.
"""

from __future__ import annotations

import ctypes
import functools
import math
import threading

import numpy as np
import torch

from spud.model.blocks.llama import LlamaBlock
from spud.model.kv_cache import SlotKVCache
from spud.model.mlp import GELU, ReLU2, SwiGLU

_ACTIVATIONS = {SwiGLU: "swiglu", ReLU2: "relu2", GELU: "gelu"}


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
        self._threads: tuple[int, int] | None = None  # (thread, count) numpy's BLAS was set in

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

        def arr(t: torch.Tensor) -> np.ndarray:  # a C-contiguous float32 copy, owned by numpy
            return np.ascontiguousarray(t.detach().float().numpy(), dtype=np.float32)

        self.embed = m.embed.weight.detach().numpy()  # read in place: rows are gathered per step
        self.cos, self.sin = m.rotary.cos.numpy(), m.rotary.sin.numpy()  # (max_len, 1, hd)
        self.layers = []
        for blk in m.blocks:
            a, mlp = blk.attn, blk.mlp
            g1, g2 = blk.attn_norm.weight, blk.mlp_norm.weight
            up = mlp.gate_up if isinstance(mlp, SwiGLU) else mlp.up
            self.layers.append({
                "qkv": arr((a.qkv.weight * g1).t()),
                "proj": arr(a.proj.weight.t()),
                "qk_gain": None if a.q_norm is None else arr(torch.cat(
                    (a.q_norm.weight.expand(self.h, -1), a.k_norm.weight.expand(self.hkv, -1)))),
                "up": arr((up.weight * g2).t()),
                "down": arr(mlp.down.weight.t()),
            })
        self.head = arr((m.lm_head.weight * m.norm.weight).t())
        self._key = self._version_key()

    # ---------------------------------------------------------------------------- the step
    def logits(self, ids: torch.Tensor, cache: SlotKVCache, slots: list[int], starts: list[int]) -> torch.Tensor:
        """(B, V) logits of the next token for ids (B,), row i continuing slot slots[i] whose
        first starts[i] positions are cached; writes the rows' keys/values like forward_slots."""
        if self._version_key() != self._key:
            self._refresh()
        if (threading.get_ident(), torch.get_num_threads()) != self._threads:
            self._threads = _match_blas_threads()
        b = ids.shape[0]
        h, hkv, hd, eps = self.h, self.hkv, self.hd, self.eps
        n_qk, half = h + hkv, self.hd // 2
        cache.bind(slots, starts, 1)
        pos = cache.positions.numpy()  # (B, 1)
        cos, sin = self.cos[pos[:, 0]], self.sin[pos[:, 0]]  # (B, 1, hd): broadcast over heads
        x = self.embed[ids.numpy()]  # (B, d), a copy: updated in place below
        for i, L in enumerate(self.layers):
            qkv = (_rms_norm(x, eps) @ L["qkv"]).reshape(b, n_qk + hkv, hd)
            qk = qkv[:, :n_qk]
            if L["qk_gain"] is not None:
                qk = _rms_norm(qk, eps) * L["qk_gain"]
            # rotary (layers.Rotary: sin is signed, the halves swapped)
            qk = qk * cos + np.concatenate((qk[..., half:], qk[..., :half]), axis=-1) * sin
            k, v = cache.update_arrays(i, qk[:, None, h:], qkv[:, None, n_qk:])  # (B, Hkv, L, hd)
            y = _attention(qk[:, :h], k, v, cache.mask_for(self.windows[i]))
            x += y.reshape(b, h * hd) @ L["proj"]
            u = _rms_norm(x, eps) @ L["up"]
            if self.act == "swiglu":
                gate, up = u[:, : u.shape[1] // 2], u[:, u.shape[1] // 2:]
                u = gate * (0.5 + 0.5 * np.tanh(0.5 * gate)) * up  # silu; tanh form never overflows
            elif self.act == "relu2":
                u = np.square(np.maximum(u, 0.0))
            else:
                u = 0.5 * u * (1.0 + np.tanh(_GELU_C * (u + 0.044715 * u * u * u)))
            x += u @ L["down"]
        cache.advance(1)
        out = _rms_norm(x, eps) @ self.head
        if self.softcap is not None:
            out = np.tanh(out * (1.0 / self.softcap)) * self.softcap
        return torch.from_numpy(out)


_GELU_C = math.sqrt(2.0 / math.pi)
# numpy >= 2: one ufunc call for the rows' sums of squares; einsum before it
_sum_squares = (lambda a: np.vecdot(a, a)) if hasattr(np, "vecdot") else (
    lambda a: np.einsum("...i,...i->...", a, a))


def _rms_norm(x: np.ndarray, eps: float) -> np.ndarray:
    """F.rms_norm(x, (last,), None, eps) in float32 (the gains are folded into the weights)."""
    return x / np.sqrt(_sum_squares(x)[..., None] * (1.0 / x.shape[-1]) + eps)


def _attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: torch.Tensor | None) -> np.ndarray:
    """One query per row: q (B, H, hd) against k, v (B, Hkv, L, hd), grouped heads sharing a
    key head (GQA), the bool mask (B, 1, 1, L) of SlotKVCache; → (B, H, hd). SDPA's arithmetic
    with its default scale."""
    b, h, hd = q.shape
    hkv = k.shape[1]
    s = q.reshape(b, hkv, h // hkv, hd) @ k.swapaxes(-1, -2)  # (B, Hkv, G, L)
    s *= hd ** -0.5
    if mask is not None:
        s = np.where(mask.numpy(), s, -np.inf)
    s -= np.maximum.reduce(s, axis=-1, keepdims=True)  # the ufuncs themselves: no wrapper's cost
    np.exp(s, out=s)
    s /= np.add.reduce(s, axis=-1, keepdims=True)
    return (s @ v).reshape(b, h, hd)


def _match_blas_threads() -> tuple[int, int]:
    """numpy's BLAS (OpenBLAS in numpy's wheels) runs the kernel's products on its own thread
    pool, which by default takes every core: give it torch's thread count instead, so that
    `--threads` / train.threads mean the same for both and ranks do not oversubscribe.

    Set for the calling thread (the engine's, which runs the steps) through OpenBLAS's
    per-thread setting where the library has it: its process-wide one is silently ignored
    while another thread that has used it lives (measured with OpenBLAS 0.3.31), as in a
    server whose engine thread decodes while others also use numpy. → (thread, count)."""
    n = torch.get_num_threads()
    local = _openblas_local_setters()
    for set_local in local:
        set_local(n)
    if not local:  # another BLAS (MKL, an older OpenBLAS): the process-wide setting
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=n, user_api="blas")
    return threading.get_ident(), n


@functools.cache
def _openblas_local_setters() -> tuple:
    """`openblas_set_num_threads_local` of each OpenBLAS numpy has loaded (found by
    threadpoolctl), where that build exports it."""
    from threadpoolctl import ThreadpoolController

    setters = []
    for lib in ThreadpoolController().select(internal_api="openblas").lib_controllers:
        fn = getattr(lib.dynlib, "openblas_set_num_threads_local", None)
        if fn is not None:
            fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
            setters.append(fn)
    return tuple(setters)
