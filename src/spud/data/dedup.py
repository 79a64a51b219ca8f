"""Exact and near-duplicate removal, streaming, first occurrence wins.

Exact duplicates: a hash of the normalised content (Unicode NFKC, lower case, whitespace collapsed),
so copies that differ only in case or spacing count as one.

Near duplicates: MinHash signatures over word n-gram shingles, bucketed by locality-sensitive
hashing (LSH) and confirmed by the signatures' estimated Jaccard similarity, the method used for
GPT-3, The Pile, RefinedWeb and FineWeb. We use `rensa` (a Rust MinHash + LSH with Python
bindings) rather than `datasketch` (pure Python/NumPy): both are maintained and deterministic for a
fixed seed, but rensa hashed the same documents' shingles 73× faster than datasketch (42,110 vs
573 documents/s, 128 permutations, `benchmarks/data_throughput.py --minhash`; docs/data.md), and
hashing is the cost of dedup at scale.

Memory: one 8-byte hash per kept document for the exact set, plus `num_perm` × 4 bytes of
signature and the LSH band keys for the near-duplicate index — ~1 KB per kept document at the
default 128 permutations. A corpus beyond one machine's memory is deduplicated per part
(`spud data build --shard i/N`) and across parts when the parts are merged.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass

from spud.errors import SpudError

_SPACE = re.compile(r"\s+")


def normalise(text: str) -> str:
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", text).lower()).strip()


def content_hash(text: str) -> bytes:
    return hashlib.blake2b(normalise(text).encode("utf-8", "replace"), digest_size=8).digest()


def shingles(text: str, n: int) -> list[str]:
    """Word n-grams of the normalised text; a document shorter than n words is one shingle."""
    words = normalise(text).split(" ")
    if len(words) <= n:
        return [" ".join(words)]
    return [" ".join(words[i:i + n]) for i in range(len(words) - n + 1)]


@dataclass
class DedupConfig:
    exact: bool = True
    near: bool = True
    threshold: float = 0.8  # estimated Jaccard similarity at which two documents are one
    ngram: int = 5          # words per shingle
    num_perm: int = 128
    bands: int | None = None  # LSH bands; None picks the banding that best fits the threshold
    seed: int = 0

    def validate(self, where: str) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise SpudError(f"{where}: dedup threshold must be in (0, 1], not {self.threshold}")
        if self.ngram < 1:
            raise SpudError(f"{where}: dedup ngram must be >= 1, not {self.ngram}")
        if self.num_perm < 2:
            raise SpudError(f"{where}: dedup num_perm must be >= 2, not {self.num_perm}")
        if self.bands is not None and (self.bands < 1 or self.num_perm % self.bands):
            raise SpudError(f"{where}: dedup bands ({self.bands}) must divide num_perm "
                            f"({self.num_perm})")


def best_bands(threshold: float, num_perm: int) -> int:
    """The number of LSH bands b (rows r = num_perm / b) whose S-curve 1 - (1 - s^r)^b crosses 1/2
    closest to the threshold, so pairs above it are found with high probability and pairs well
    below it rarely become candidates (and candidates are confirmed by Jaccard anyway)."""
    best, best_err = 1, float("inf")
    for b in range(1, num_perm + 1):
        if num_perm % b:
            continue
        r = num_perm // b
        crossing = (1 - 0.5 ** (1 / b)) ** (1 / r)
        if abs(crossing - threshold) < best_err:
            best, best_err = b, abs(crossing - threshold)
    return best


class Deduplicator:
    """Feed documents in a deterministic order; `check` says whether each is new. Shared across
    sources, so a document repeated in two sources is kept once (in the first)."""

    def __init__(self, cfg: DedupConfig):
        cfg.validate("data.dedup")
        self.cfg = cfg
        self._exact: set[bytes] = set()
        self._sigs: dict[int, object] = {}
        self._lsh = None
        if cfg.near:
            from rensa import RMinHashLSH  # noqa: PLC0415 - optional until near-dup is used

            self._lsh = RMinHashLSH(cfg.threshold, cfg.num_perm,
                                    cfg.bands or best_bands(cfg.threshold, cfg.num_perm))
        self.removed: Counter = Counter()        # (source, "exact"|"near") → documents
        self.removed_bytes: Counter = Counter()

    def signature(self, text: str):
        from rensa import RMinHash  # noqa: PLC0415

        m = RMinHash(self.cfg.num_perm, self.cfg.seed)
        m.update(shingles(text, self.cfg.ngram))
        return m

    def check(self, text: str, source: str = "") -> str | None:
        """None if the document is new (and remember it), else "exact" or "near"."""
        h = content_hash(text) if self.cfg.exact else None
        sig = None
        if self._lsh is not None and (h is None or h not in self._exact):
            sig = self.signature(text)
        return self.check_hashed(h, sig, len(text.encode("utf-8", "replace")), source)

    def check_hashed(self, h: bytes | None, sig, nbytes: int, source: str = "") -> str | None:
        """`check` for a document hashed elsewhere (a part of a sharded build): its content hash
        (None when exact dedup is off) and MinHash signature (None when near dedup is off)."""
        kind = None
        if h is not None and h in self._exact:
            kind = "exact"
        if kind is None and self._lsh is not None:
            for key in self._lsh.query(sig):
                if sig.jaccard(self._sigs[key]) >= self.cfg.threshold:
                    kind = "near"
                    break
        if kind is not None:
            self.removed[(source, kind)] += 1
            self.removed_bytes[(source, kind)] += nbytes
            return kind
        if h is not None:
            self._exact.add(h)
        if sig is not None:
            key = len(self._sigs)
            self._sigs[key] = sig
            self._lsh.insert(key, sig)
        return None

    def stats(self, source: str) -> dict:
        return {kind: {"documents": self.removed[(source, kind)],
                       "bytes": self.removed_bytes[(source, kind)]} for kind in ("exact", "near")}
