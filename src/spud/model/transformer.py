"""The decoder-only Transformer shell, its KV cache, and Hugging Face Llama weight export.

The shell owns what every architecture shares (token embedding, rotary tables, final norm, LM
head, loss, init, cache bookkeeping); the per-layer computation comes from the block registry
(registry.py), so a new architecture never touches this file.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from spud.config import ModelConfig
from spud.errors import SpudError
from spud.model.layers import RMSNorm, Rotary, init_weights, linear_cross_entropy
from spud.model.registry import get_block

IGNORE_INDEX = -1


class KVCache:
    """Preallocated keys/values for incremental decoding.

    One (B, n_kv_heads, max_len, head_dim) tensor per layer for k and for v, filled left to right.
    `pos` is the number of positions already cached; it is also the rotary position offset of the
    next tokens. Each attention layer writes its new keys/values at [pos, pos+T) and reads
    [0, pos+T); the model advances `pos` once after all layers have run.
    """

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        n_kv_heads: int,
        max_len: int,
        head_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.batch_size = batch_size
        self.max_len = max_len
        self.pos = 0

    # Attention dispatches on this: one shared offset for all rows (False) or per-row positions.
    per_row = False

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v of shape (B, n_kv_heads, T, head_dim); return all keys/values so far."""
        end = self.pos + k.shape[2]
        self.k[layer][:, :, self.pos : end] = k
        self.v[layer][:, :, self.pos : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def check(self, batch_size: int, t: int) -> None:
        if batch_size != self.batch_size:
            raise SpudError(
                f"KV cache was made for batch size {self.batch_size}, got a batch of "
                f"{batch_size}; create a new one with model.new_kv_cache({batch_size}, ...)"
            )
        if self.pos + t > self.max_len:
            raise SpudError(
                f"KV cache is full: {self.pos} cached + {t} new positions > max_len="
                f"{self.max_len}; create the cache with a larger max_len"
            )

    def advance(self, t: int) -> None:
        self.pos += t

    def reset(self) -> None:
        """Reuse the buffers for a new sequence (old contents are simply overwritten)."""
        self.pos = 0


class SlotKVCache:
    """KV memory for continuous batching: `n_slots` independent sequences, each in its own row
    of a (n_slots, max_len, n_kv_heads, head_dim) tensor per layer, each with its own length.

    Position-major layout (unlike KVCache's head-major one): a step writes one position for
    rows in arbitrary slots at arbitrary positions, and with (slot, position) adjacent that is
    a single index_copy_ into a flat (n_slots·max_len, Hkv, hd) view: measured 10-100x faster
    on CPU than scattering into (slot, :, position) of the head-major layout. Attention reads
    a transposed view; SDPA accepts the strides, so nothing is copied for that.

    The cache does not track lengths itself: the caller (the serving engine) knows them and
    `bind`s each forward to (slots, start positions, T). bind builds the per-row positions and
    the attention mask once per forward instead of once per layer.
    """

    per_row = True

    def __init__(
        self,
        n_layers: int,
        n_slots: int,
        n_kv_heads: int,
        max_len: int,
        head_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (n_slots, max_len, n_kv_heads, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.n_slots = n_slots
        self.max_len = max_len
        self.device = torch.device(device) if device is not None else self.k[0].device
        self._bound: tuple[int, int] | None = None

    def bind(self, slots: list[int], starts: list[int], t: int) -> None:
        """Prepare a forward of T new tokens for each slot, written at starts[i] .. +T-1."""
        if len(slots) != len(starts) or not slots:
            raise SpudError("SlotKVCache.bind needs one start position per slot (and >= 1 slot)")
        if len(set(slots)) != len(slots) or min(slots) < 0 or max(slots) >= self.n_slots:
            raise SpudError(f"slots must be distinct and in [0, {self.n_slots}), got {slots}")
        kv_len = max(starts) + t
        if min(starts) < 0 or kv_len > self.max_len:
            raise SpudError(
                f"slot cache is full: positions up to {kv_len} > max_len={self.max_len}"
            )
        dev = self.device
        start = torch.tensor(starts, device=dev)
        self.positions = start[:, None] + torch.arange(t, device=dev)  # (B, T)
        if t == 1 and min(starts) == kv_len - 1:
            # One new token per row and every row as long as the longest: each query sees all
            # kv_len keys, so the mask would be all True. None lets SDPA skip reading it.
            self.mask = None
        else:
            self.mask = torch.arange(kv_len, device=dev) <= self.positions[:, None, :, None]
        self.rotary_tables: tuple[torch.Tensor, torch.Tensor] | None = None  # see rotary_at
        self.kv_len = kv_len
        s0 = slots[0]
        # Consecutive slots (the common case: the engine hands out the lowest free slot) are
        # read as a strided view; anything else is gathered, copying only [0, kv_len).
        self.slice = slice(s0, s0 + len(slots)) if slots == list(range(s0, s0 + len(slots))) else None
        self.slot_idx = torch.tensor(slots, device=dev)
        self.flat_idx = (self.slot_idx[:, None] * self.max_len + self.positions).view(-1)
        self._bound = (len(slots), t)

    def rotary_at(self, rotary, x: torch.Tensor) -> torch.Tensor:
        """rotary.at(x, self.positions), with the cos/sin rows gathered once per forward
        instead of once per layer (every layer rotates the same positions)."""
        if self.rotary_tables is None:
            self.rotary_tables = rotary.tables_at(self.positions)
        cos, sin = self.rotary_tables
        return rotary.apply(x, cos.to(x.dtype), sin.to(x.dtype))

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v of shape (B, T, n_kv_heads, head_dim) at the bound positions; return each
        row's keys/values (B, n_kv_heads, kv_len, head_dim), kv_len = longest bound row."""
        out = []
        for buf, new in ((self.k[layer], k), (self.v[layer], v)):
            flat = buf.view(-1, *buf.shape[2:])
            flat.index_copy_(0, self.flat_idx, new.reshape(-1, *new.shape[2:]).to(buf.dtype))
            if self.slice is not None:
                rows = buf[self.slice, : self.kv_len]
            else:
                rows = buf[:, : self.kv_len].index_select(0, self.slot_idx)
            out.append(rows.transpose(1, 2))
        return out[0], out[1]

    def check(self, batch_size: int, t: int) -> None:
        if self._bound != (batch_size, t):
            raise SpudError(
                f"SlotKVCache is bound to (batch, T)={self._bound}, got ({batch_size}, {t}); "
                "call model.forward_slots (or cache.bind) with matching slots"
            )

    def advance(self, t: int) -> None:
        self._bound = None  # lengths live with the caller; force a fresh bind per forward


class Transformer(nn.Module):
    """Token embedding → N registry blocks → RMSNorm → LM head (optionally tied, soft-capped)."""

    # Mean loss through layers.linear_cross_entropy; False = plain logits + F.cross_entropy
    # (same numbers, kept as the reference the fused path is tested against).
    fused_loss: bool = True

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.vocab_size is None:
            raise SpudError(
                "model.vocab_size is not set; train or load a tokenizer first (the run fills it "
                "in from the tokenizer) or set model.vocab_size explicitly"
            )
        self.cfg = cfg
        block_cls = get_block(cfg.block)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else None
        self.rotary = Rotary(cfg.dim_head, cfg.max_seq_len, cfg.rope_theta)
        self.blocks = nn.ModuleList(block_cls(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        init_weights(self, cfg.init_std, cfg.n_layers)
        if cfg.tie_embeddings:
            # Share the Parameter itself so optimizers and state_dict see one tensor.
            self.lm_head.weight = self.embed.weight

    # ------------------------------------------------------------------------------ forward
    def hidden_states(self, idx: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        """Final-normed hidden states (B, T, d_model): everything except the LM head."""
        if idx.dim() != 2:
            raise SpudError(f"expected token ids of shape (batch, time), got {tuple(idx.shape)}")
        b, t = idx.shape
        if kv_cache is not None:
            kv_cache.check(b, t)
        x = self.embed(idx)
        if self.drop is not None:
            x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, self.rotary, kv_cache, i)
        if kv_cache is not None:
            kv_cache.advance(t)
        return self.norm(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        out = self.lm_head(h)
        cap = self.cfg.logit_softcap
        if cap is not None:
            # Soft-capping bounds logits smoothly (Gemma 2), keeping gradients alive at the cap.
            out = torch.tanh(out / cap) * cap
        return out

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        return_per_token_loss: bool = False,
    ) -> torch.Tensor:
        """Logits (B, T, V) without targets; with targets the mean cross-entropy (scalar), or
        the (B, T) per-token loss when return_per_token_loss (ignored positions → 0).

        Targets equal to -1 are ignored (padding / document masking).
        """
        h = self.hidden_states(idx, kv_cache)
        if targets is None:
            return self.logits(h)
        if targets.shape != idx.shape:
            raise SpudError(
                f"targets shape {tuple(targets.shape)} must equal idx shape {tuple(idx.shape)}"
            )
        if self.fused_loss and not return_per_token_loss:
            # LM head + soft-cap + mean cross-entropy in row chunks, never holding (B·T, V)
            # logits: the largest activation of a small model and the slowest part of its step.
            return linear_cross_entropy(
                h.reshape(-1, h.shape[-1]), self.lm_head.weight, targets.reshape(-1),
                self.cfg.logit_softcap, IGNORE_INDEX,
            )
        logits = self.logits(h)
        # One flattened cross_entropy call; .float() is a no-op for fp32 logits (under bf16
        # autocast it is the one copy needed for a stable loss).
        flat = logits.view(-1, logits.shape[-1]).float()
        reduction = "none" if return_per_token_loss else "mean"
        loss = F.cross_entropy(flat, targets.reshape(-1), ignore_index=IGNORE_INDEX,
                               reduction=reduction)
        return loss.view(targets.shape) if return_per_token_loss else loss

    def per_token_loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(B, T) float32 cross-entropy in nats per target token (0 where target == -1)."""
        return self.forward(idx, targets, return_per_token_loss=True)

    # ------------------------------------------------------------------------------ helpers
    def new_kv_cache(
        self,
        batch_size: int,
        max_len: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> KVCache:
        """An empty cache; defaults: max_seq_len positions, the model's device and dtype."""
        return self._new_cache(KVCache, "KV cache", batch_size, max_len, device, dtype)

    def new_slot_cache(
        self,
        n_slots: int,
        max_len: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> SlotKVCache:
        """An empty slot cache for continuous batching (see SlotKVCache)."""
        return self._new_cache(SlotKVCache, "slot cache", n_slots, max_len, device, dtype)

    def _new_cache(self, kind, what: str, rows: int, max_len, device, dtype):
        max_len = max_len or self.cfg.max_seq_len
        if max_len > self.cfg.max_seq_len:
            raise SpudError(
                f"{what} max_len={max_len} exceeds model.max_seq_len={self.cfg.max_seq_len} "
                "(rotary tables end there); use a smaller max_len"
            )
        w = self.embed.weight
        return kind(
            self.cfg.n_layers, rows, self.cfg.kv_heads, max_len, self.cfg.dim_head,
            device=device if device is not None else w.device,
            dtype=dtype if dtype is not None else w.dtype,
        )

    def forward_slots(
        self, idx: torch.Tensor, cache: SlotKVCache, slots: list[int], starts: list[int]
    ) -> torch.Tensor:
        """Final-normed hidden states (B, T, d) for idx (B, T): row i continues the sequence in
        cache slot slots[i], whose first starts[i] positions are already cached. The LM head is
        left to the caller, which usually needs only the last position's logits."""
        cache.bind(slots, starts, idx.shape[1])
        return self.hidden_states(idx, cache)

    def num_params(self, non_embedding: bool = False) -> int:
        """Unique parameters; non_embedding leaves out the vocab×d matrices (embedding, and the
        LM head when untied), the convention of scaling-law parameter counts."""
        n = sum(p.numel() for p in self.parameters())  # parameters() already dedups ties
        if non_embedding:
            n -= self.embed.weight.numel()
            if not self.cfg.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n


# ----------------------------------------------------------------------- Hugging Face export
def hf_llama_config(cfg: ModelConfig) -> dict[str, Any]:
    """Keyword arguments for transformers.LlamaConfig describing the same network as `cfg`."""
    _check_llama_compatible(cfg)
    return dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.hidden,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.dim_head,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        max_position_embeddings=cfg.max_seq_len,
        tie_word_embeddings=cfg.tie_embeddings,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        initializer_range=cfg.init_std,
    )


def _check_llama_compatible(cfg: ModelConfig) -> None:
    problems = []
    if cfg.block != "llama":
        problems.append(f"block={cfg.block!r} (needs 'llama')")
    if cfg.mlp != "swiglu":
        problems.append(f"mlp={cfg.mlp!r} (needs 'swiglu')")
    if cfg.qk_norm:
        problems.append("qk_norm=true (Llama has no QK-norm)")
    if cfg.logit_softcap is not None:
        problems.append("logit_softcap is set (Llama has no soft-cap)")
    if problems:
        raise SpudError(
            "model is not expressible as a Hugging Face Llama: " + "; ".join(problems)
        )


def to_hf_llama_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's weights under LlamaForCausalLM's names, fused projections split back.

    Tensors are views of the model's parameters (detached, no copies); `load_state_dict` on the
    HF model copies them. Both sides use the half-rotation rotary convention, so no permutation
    of q/k rows is needed.
    """
    cfg = model.cfg
    _check_llama_compatible(cfg)
    h, hkv, hd, f = cfg.n_heads, cfg.kv_heads, cfg.dim_head, cfg.hidden
    sd: dict[str, torch.Tensor] = {"model.embed_tokens.weight": model.embed.weight.detach()}
    for i, blk in enumerate(model.blocks):
        p = f"model.layers.{i}."
        qkv = blk.attn.qkv.weight.detach()
        gate_up = blk.mlp.gate_up.weight.detach()
        sd[p + "input_layernorm.weight"] = blk.attn_norm.weight.detach()
        sd[p + "self_attn.q_proj.weight"] = qkv[: h * hd]
        sd[p + "self_attn.k_proj.weight"] = qkv[h * hd : (h + hkv) * hd]
        sd[p + "self_attn.v_proj.weight"] = qkv[(h + hkv) * hd :]
        sd[p + "self_attn.o_proj.weight"] = blk.attn.proj.weight.detach()
        sd[p + "post_attention_layernorm.weight"] = blk.mlp_norm.weight.detach()
        sd[p + "mlp.gate_proj.weight"] = gate_up[:f]
        sd[p + "mlp.up_proj.weight"] = gate_up[f:]
        sd[p + "mlp.down_proj.weight"] = blk.mlp.down.weight.detach()
    sd["model.norm.weight"] = model.norm.weight.detach()
    sd["lm_head.weight"] = model.lm_head.weight.detach()
    return sd
