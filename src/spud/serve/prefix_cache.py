"""Prefix cache: keys and values of token blocks that earlier requests computed (a system prompt,
the earlier turns of a chat, a few-shot context), reused by later requests that start with the
same tokens, so their prefill starts after the shared part.

Blocks are `block` tokens long and keyed by a chained hash: block i's key hashes block i-1's
key and block i's token ids, so a key names the whole prefix up to the block's end and two
prompts share a block only if they agree on everything before it. Entries are copies (one
(block, kv_heads, head_dim) tensor per layer for K and V), so a cached block outlives the slot
that produced it; the least recently used blocks are evicted beyond `max_tokens`.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch


class PrefixCache:
    def __init__(self, block: int, max_tokens: int) -> None:
        if block < 1 or max_tokens < block:
            raise ValueError(f"prefix cache needs block >= 1 and max_tokens >= block, "
                             f"got {block}, {max_tokens}")
        self.block = block
        self.max_blocks = max_tokens // block
        self._blocks: OrderedDict[bytes, tuple[list[torch.Tensor], list[torch.Tensor]]] = OrderedDict()
        self.lookup_tokens = 0  # prompt tokens looked up
        self.hit_tokens = 0  # of which served from the cache
        self.evictions = 0

    def _keys(self, ids: list[int], n_blocks: int) -> list[bytes]:
        keys, prev = [], b""
        for i in range(n_blocks):
            chunk = ids[i * self.block:(i + 1) * self.block]
            prev = hashlib.blake2b(prev + b"|" + ",".join(map(str, chunk)).encode(), digest_size=16).digest()
            keys.append(prev)
        return keys

    def load(self, ids: list[int], cache, slot: int) -> int:
        """Copy the longest cached prefix of ids into `slot` of the SlotKVCache, leaving at least
        the last token to compute (its logits give the first sampled token); → tokens loaded."""
        self.lookup_tokens += len(ids)
        found = []
        for key in self._keys(ids, (len(ids) - 1) // self.block):
            entry = self._blocks.get(key)
            if entry is None:
                break
            self._blocks.move_to_end(key)
            found.append(entry)
        for i, (ks, vs) in enumerate(found):
            a, b = i * self.block, (i + 1) * self.block
            for layer, (k, v) in enumerate(zip(ks, vs)):
                cache.k[layer][slot, a:b] = k
                cache.v[layer][slot, a:b] = v
        n = len(found) * self.block
        self.hit_tokens += n
        return n

    def store(self, ids: list[int], cache, slot: int) -> None:
        """Keep the full blocks of ids (whose keys and values are in `slot`) not cached yet."""
        for i, key in enumerate(self._keys(ids, len(ids) // self.block)):
            if key in self._blocks:
                self._blocks.move_to_end(key)
                continue
            a, b = i * self.block, (i + 1) * self.block
            self._blocks[key] = ([k[slot, a:b].clone() for k in cache.k],
                                 [v[slot, a:b].clone() for v in cache.v])
            while len(self._blocks) > self.max_blocks:
                self._blocks.popitem(last=False)
                self.evictions += 1

    def stats(self) -> dict:
        return {"prefix_cache_blocks": len(self._blocks), "prefix_cache_lookup_tokens": self.lookup_tokens,
                "prefix_cache_hit_tokens": self.hit_tokens, "prefix_cache_evictions": self.evictions,
                "prefix_cache_hit_rate": self.hit_tokens / self.lookup_tokens if self.lookup_tokens else 0.0}
