"""KV caches for incremental decoding: `KVCache` (one sequence offset shared by all rows, used by
`generate` and chunked prefill) and `SlotKVCache` (continuous batching: rows in independent slots,
each at its own position, used by the serving engine).

Both keep every position of every layer, local (sliding-window) layers included: a windowed
layer simply masks keys older than its window, so both caches serve any attention pattern.
"""

from __future__ import annotations

import numpy as np
import torch

from spud.errors import SpudError


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


class SharedPrefix:
    """One prefix's keys and values, shared by every row of a continuation, inside the autograd
    graph (training): RL's update scores G completions of one prompt, and with this the trunk
    runs on the prompt once instead of G times (spud.posttrain.rl_logprobs).

    Used for exactly two forwards through the model's cache interface (per_row False, like
    KVCache): the first, on the prefix (batch 1, P tokens), records each layer's keys/values
    and returns them as they are; the second, on the continuation (B rows, T tokens at
    positions P..P+T-1), gets them prepended to its own, broadcast over the rows (`expand`:
    the backward sums the rows' gradients into the one prefix). Nothing is written in place,
    which autograd would refuse once the prefix's keys are saved for backward.
    """

    per_row = False

    def __init__(self) -> None:
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.pos = 0  # positions recorded: the continuation's rotary offset
        self._forwards = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._forwards == 0:  # the prefix: record
            self.k.append(k)
            self.v.append(v)
            return k, v
        b = k.shape[0]
        pk, pv = self.k[layer].expand(b, -1, -1, -1), self.v[layer].expand(b, -1, -1, -1)
        return torch.cat((pk, k.to(pk.dtype)), dim=2), torch.cat((pv, v.to(pv.dtype)), dim=2)

    def check(self, batch_size: int, t: int) -> None:
        if self._forwards == 0 and batch_size != 1:
            raise SpudError(f"SharedPrefix records one prefix (batch 1), got a batch of {batch_size}")
        if self._forwards > 1:
            raise SpudError("SharedPrefix serves one continuation forward after its prefix")

    def advance(self, t: int) -> None:
        if self._forwards == 0:
            self.pos = t
        self._forwards += 1


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
        # (n_slots·max_len, Hkv, hd) views of the same memory, where update writes: made once,
        # a decode step is a few microseconds of such bookkeeping per layer
        self._flat = [(k.view(-1, *shape[2:]), v.view(-1, *shape[2:])) for k, v in zip(self.k, self.v)]
        self._arrays: list[tuple[np.ndarray, ...]] | None = None  # numpy views: see update_arrays
        self.n_slots = n_slots
        self.max_len = max_len
        self.device = torch.device(device) if device is not None else self.k[0].device
        self._bound: tuple[int, int] | None = None
        self._slots_key: tuple[int, ...] | None = None  # see bind

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
        # (B, T); a decode step (T = 1) needs no arange: the starts are the positions
        self.positions = start[:, None] if t == 1 else start[:, None] + torch.arange(t, device=dev)
        if t == 1 and min(starts) == kv_len - 1:
            # One new token per row and every row as long as the longest: each query sees all
            # kv_len keys, so the mask would be all True. None lets SDPA skip reading it.
            self.mask = None
        else:
            self.mask = torch.arange(kv_len, device=dev) <= self.positions[:, None, :, None]
        self.rotary_tables: tuple[torch.Tensor, torch.Tensor] | None = None  # see rotary_at
        self._window_masks: dict[int, torch.Tensor | None] = {}  # see mask_for
        self.kv_len = kv_len
        key = tuple(slots)
        if self._slots_key != key:
            # Consecutive decode steps keep the same slots while no request joins or leaves,
            # so what depends on the slots alone is built once per batch membership.
            s0 = slots[0]
            # Consecutive slots (the common case: the engine hands out the lowest free slot)
            # are read as a strided view; anything else is gathered, copying only [0, kv_len).
            self._slots_key = key
            self._slice = slice(s0, s0 + len(slots)) if key == tuple(range(s0, s0 + len(slots))) else None
            self._slot_idx = torch.tensor(slots, device=dev)
            self._slot_base = self._slot_idx[:, None] * self.max_len  # (B, 1): row offsets
        self.slice, self.slot_idx = self._slice, self._slot_idx
        self.flat_idx = (self._slot_base + self.positions).view(-1)
        self._np_idx: tuple[np.ndarray, np.ndarray] | None = None  # update_arrays' copy of the indices
        self._bound = (len(slots), t)

    def mask_for(self, window: int | None) -> torch.Tensor | None:
        """The bound forward's mask for a layer attending to its last `window` positions
        (None = global): `mask` further limited to keys within the window of each query, built
        once per forward and window, shared by all layers with that window."""
        if window is None:
            return self.mask
        if window not in self._window_masks:
            kpos = torch.arange(self.kv_len, device=self.device)
            recent = kpos > self.positions[:, None, :, None] - window  # (B, 1, T, L)
            if self.mask is None:
                # Every query sees all kv_len keys; the window cuts only if it is shorter.
                self._window_masks[window] = recent if self.kv_len > window else None
            else:
                self._window_masks[window] = self.mask & recent
        return self._window_masks[window]

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
        return self._write_read(self.k[layer], self._flat[layer][0], k), \
            self._write_read(self.v[layer], self._flat[layer][1], v)

    def update_arrays(self, layer: int, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`update` for numpy arrays, through numpy views of the same memory (CPU caches only):
        the serving engine's decode kernel computes in numpy, where a write and a read cost a
        few microseconds instead of a few torch calls each."""
        if self._arrays is None:
            self._arrays = [tuple(t.detach().numpy() for t in (k_, v_, fk, fv))
                            for (k_, v_), (fk, fv) in zip(zip(self.k, self.v), self._flat)]
        if self._np_idx is None:
            self._np_idx = (self.flat_idx.numpy(), self.slot_idx.numpy())
        buf_k, buf_v, flat_k, flat_v = self._arrays[layer]
        return self._write_read(buf_k, flat_k, k), self._write_read(buf_v, flat_v, v)

    def _write_read(self, buf, flat, new):
        # this runs twice per layer per decode step: each skipped call (a no-op dtype cast, a
        # reshape with unpacked sizes) is a measurable share of a small model's step on a CPU
        if isinstance(new, np.ndarray):  # update_arrays: the same write and read in numpy
            flat_idx, slot_idx = self._np_idx
            flat[flat_idx] = new.reshape(-1, *new.shape[2:])
            rows = buf[self.slice, : self.kv_len] if self.slice is not None else buf[slot_idx, : self.kv_len]
            return rows.swapaxes(1, 2)
        if new.dtype != buf.dtype:
            new = new.to(buf.dtype)
        flat.index_copy_(0, self.flat_idx, new.flatten(0, 1))
        if self.slice is not None:
            return buf[self.slice, : self.kv_len].transpose(1, 2)
        return buf[:, : self.kv_len].index_select(0, self.slot_idx).transpose(1, 2)

    def copy_positions(self, from_slots: list[int], to_slots: list[int], starts: list[int], n: int) -> None:
        """Copy positions [starts[i], starts[i] + n) of slot from_slots[i] into slot to_slots[i],
        every layer's keys and values (the engine's copies of one prompt share one prefill)."""
        offsets = torch.tensor(starts, device=self.device)[:, None] + torch.arange(n, device=self.device)
        src = (torch.tensor(from_slots, device=self.device)[:, None] * self.max_len + offsets).view(-1)
        dst = (torch.tensor(to_slots, device=self.device)[:, None] * self.max_len + offsets).view(-1)
        for fk, fv in self._flat:
            fk.index_copy_(0, dst, fk.index_select(0, src))
            fv.index_copy_(0, dst, fv.index_select(0, src))

    def check(self, batch_size: int, t: int) -> None:
        if self._bound != (batch_size, t):
            raise SpudError(
                f"SlotKVCache is bound to (batch, T)={self._bound}, got ({batch_size}, {t}); "
                "call model.forward_slots (or cache.bind) with matching slots"
            )

    def advance(self, t: int) -> None:
        self._bound = None  # lengths live with the caller; force a fresh bind per forward
