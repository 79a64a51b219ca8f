"""A from-the-file reference forward of a GGUF written by `spud export gguf`, following llama.cpp's
conventions and reading nothing but the file: tensors by their GGUF names (dequantized), dims and
eps from the metadata, "normal" (adjacent-pair) RoPE for the `llama` arch and NeoX (half) RoPE
for `qwen3`, as llama.cpp applies them. It is not llama.cpp, but it checks everything the file
must get right for llama.cpp to compute Spud's function: names, layouts, the q/k permutation,
metadata, and the precision left after f16/q8_0."""

from __future__ import annotations

import numpy as np


def load(path) -> tuple[dict, dict]:
    import gguf

    r = gguf.GGUFReader(str(path))
    meta = {}
    for name, f in r.fields.items():
        try:
            meta[name] = f.contents()
        except Exception:  # noqa: BLE001 - raw fields without a Python value
            pass
    tensors = {}
    for t in r.tensors:
        shape = [int(d) for d in reversed(t.shape)]
        data = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        tensors[t.name] = np.asarray(data, dtype=np.float64).reshape(shape)
    return meta, tensors


def _rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _rope(x, pos, theta, pairwise):
    """x (T, H, hd): llama.cpp rotates (x[2i], x[2i+1]) for llama, (x[i], x[i+hd/2]) for NeoX."""
    hd = x.shape[-1]
    inv = theta ** (-np.arange(0, hd, 2) / hd)
    ang = pos[:, None] * inv[None, :]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    if pairwise:
        a, b = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
        return out
    a, b = x[..., : hd // 2], x[..., hd // 2 :]
    return np.concatenate([a * cos - b * sin, a * sin + b * cos], -1)


def forward(meta: dict, w: dict, ids: list[int]) -> np.ndarray:
    """Logits (T, n_vocab) for one sequence of token ids."""
    arch = meta["general.architecture"]
    n_layers, heads = meta[f"{arch}.block_count"], meta[f"{arch}.attention.head_count"]
    kv, hd = meta[f"{arch}.attention.head_count_kv"], meta[f"{arch}.attention.key_length"]
    eps, theta = meta[f"{arch}.attention.layer_norm_rms_epsilon"], meta[f"{arch}.rope.freq_base"]
    t = len(ids)
    pos = np.arange(t, dtype=np.float64)
    x = w["token_embd.weight"][ids]
    mask = np.triu(np.full((t, t), -np.inf), 1)
    for i in range(n_layers):
        p = f"blk.{i}."
        h = _rms(x, w[p + "attn_norm.weight"], eps)
        q = (h @ w[p + "attn_q.weight"].T).reshape(t, heads, hd)
        k = (h @ w[p + "attn_k.weight"].T).reshape(t, kv, hd)
        v = (h @ w[p + "attn_v.weight"].T).reshape(t, kv, hd)
        if p + "attn_q_norm.weight" in w:
            q, k = _rms(q, w[p + "attn_q_norm.weight"], eps), _rms(k, w[p + "attn_k_norm.weight"], eps)
        q, k = _rope(q, pos, theta, arch == "llama"), _rope(k, pos, theta, arch == "llama")
        rep = heads // kv
        k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
        s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd) + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        a = np.einsum("hqk,khd->qhd", s / s.sum(-1, keepdims=True), v).reshape(t, heads * hd)
        x = x + a @ w[p + "attn_output.weight"].T
        h = _rms(x, w[p + "ffn_norm.weight"], eps)
        g = h @ w[p + "ffn_gate.weight"].T
        x = x + ((g / (1 + np.exp(-g))) * (h @ w[p + "ffn_up.weight"].T)) @ w[p + "ffn_down.weight"].T
    x = _rms(x, w["output_norm.weight"], eps)
    return x @ w.get("output.weight", w["token_embd.weight"]).T
