"""The data mix: how many tokens each source contributes, and the train/val split.

Source i gets `total_tokens * w_i / sum(w)` tokens (train + val). Sources are read in order, one
document at a time, and tokenized in batches on the Rust side (`encode_batch`, all cores):

- a source with fewer tokens is repeated (epochs > 1); repeats take whole documents in their
  original order, so the last partial epoch is a prefix of the source;
- a larger source is cut: reading stops once its target is reached (epochs < 1), and batches are
  sized from the remaining budget so little is tokenized past the cut;
- the infinite generators simply stop at their target.

Every source gets exactly its target: the document that crosses it is cut there (the rest of it
is not used). A document longer than 1 MiB is read in pieces (sources.MAX_DOCUMENT_BYTES), so a
10 MB one-line file costs 1 MiB of memory, not the whole file's tokens. When the very first
document alone covers the whole budget (the source is in effect one document), its cut part is
split by position, the last val_fraction of it going to validation, so the source still has
validation text; and the build warns when one document supplies most of a source's tokens.

A document's split is a pure function of its text (blake2b hash < val_fraction → val): the same
document is in the same split in every build and in every repeat, so repetition cannot leak
training text into validation. Validation documents are only taken on the first pass: repeating
them would only make the val loss noisier, not more informative.

Every document is written as [BOS, tokens...]: BOS is the document separator, so the model learns
that what follows BOS is a fresh start.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from spud.config import Config, DataConfig
from spud.data.progress import TokenBar
from spud.data.sources import MAX_DOCUMENT_BYTES, Document, Source, open_sources
from spud.errors import SpudError
from spud.tokenizer import Tokenizer

WriteTokens = Callable[[str, np.ndarray], None]  # (split, tokens) → appended to that split

BYTES_PER_TOKEN_GUESS = 4.0  # until the first batch measures the real ratio
MIN_BATCH_BYTES = 16 << 10
MAX_BATCH_BYTES = 2 << 20  # big enough to keep all cores busy, small enough to cut precisely
MAX_BATCH_DOCS = 4096
REPEAT_CACHE_TOKENS = 16_000_000  # a repeated source up to this size is replayed from memory
DOMINANT_SHARE = 0.5  # one document above this share of its source's tokens → a warning


def token_targets(data: DataConfig) -> list[int]:
    total_weight = sum(s.weight for s in data.sources)
    return [round(data.total_tokens * s.weight / total_weight) for s in data.sources]


def is_val_document(text: str, val_fraction: float) -> bool:
    if val_fraction <= 0:
        return False
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < val_fraction


def _in_val(doc: Document, val_fraction: float) -> bool:
    # A document replayed by `spud data merge` carries the split its part computed from its text.
    known = getattr(doc, "val", None)
    return is_val_document(doc.text, val_fraction) if known is None else known


# ------------------------------------------------------------------------------------ encoding
def encoded_documents(
    docs: Iterator[Document], tokenizer: Tokenizer, budget: Callable[[], int]
) -> Iterator[tuple[Document, np.ndarray]]:
    """Each document with its tokens ([BOS, ...] as uint32). Batches are sized from `budget()`
    (tokens still wanted, asked before each batch) times the measured bytes per token."""
    bos = tokenizer.bos_id
    seen_bytes, seen_tokens = 0, 0
    while True:
        if seen_tokens:
            limit = budget() * seen_bytes / seen_tokens * 1.1
            limit = min(max(limit, MIN_BATCH_BYTES), MAX_BATCH_BYTES)
        else:  # a small first batch measures bytes/token (1.5 for digits, 4+ for prose)
            limit = MIN_BATCH_BYTES
        batch, size = [], 0
        for doc in docs:  # a for/break over a generator leaves it open for the next batch
            batch.append(doc)
            size += doc.nbytes
            if size >= limit or len(batch) >= MAX_BATCH_DOCS:
                break
        if not batch:
            return
        # Documents a worker process already encoded (spud.data.workers) carry their tokens.
        todo = [d.text for d in batch if getattr(d, "tokens", None) is None]
        encoded = iter(tokenizer.encode_batch(todo) if todo else ())
        for doc in batch:
            tokens = getattr(doc, "tokens", None)
            if tokens is None:
                ids = next(encoded)
                tokens = np.empty(len(ids) + 1, dtype=np.uint32)
                tokens[0] = bos
                tokens[1:] = ids
            seen_bytes += doc.nbytes
            seen_tokens += len(tokens)
            yield doc, tokens


@dataclass
class _Tally:
    target: int
    train: int = 0
    val: int = 0
    documents: int = 0  # distinct documents taken (first pass; the pieces of one count once)
    bytes: int = 0
    passes: int = 0  # complete passes over the source
    progress: float = 0.0  # share of the current pass consumed
    cut: str | None = None  # where the document cut at the target came from
    # The largest document of the first pass (its pieces counted together), for the warning.
    first_pass_tokens: int = 0
    current: str | None = None
    current_tokens: int = 0
    largest: str | None = None
    largest_tokens: int = 0

    @property
    def taken(self) -> int:
        return self.train + self.val

    def count_document(self, where: str, tokens: int) -> None:
        """Account a first-pass document (or piece: consecutive pieces share `where`)."""
        self.first_pass_tokens += tokens
        if where != self.current:
            self.documents += 1
            self.current, self.current_tokens = where, 0
        self.current_tokens += tokens
        if self.current_tokens > self.largest_tokens:
            self.largest, self.largest_tokens = where, self.current_tokens


def _close(docs: Iterator[Document] | None) -> None:
    """Cut mid-pass: release the source's open file now rather than at garbage collection."""
    if docs is not None:
        docs.close()


def _mix_source(
    source: Source, target: int, tokenizer: Tokenizer, data: DataConfig, write: WriteTokens,
    bar: TokenBar, log: Callable[[str], None],
) -> dict:
    tally = _Tally(target)
    source.budget = lambda: target - tally.taken  # how far worker processes read ahead
    # Train documents of the first pass, kept (if small) so repeats need no re-read/re-encode.
    cache: list[tuple[np.ndarray, float]] | None = []
    cached_tokens = 0
    while tally.taken < target:
        first = tally.passes == 0
        docs = None
        if first or cache is None:
            docs = source.documents()
            pairs = encoded_documents(docs, tokenizer, lambda: target - tally.taken)
            items = ((t, _in_val(d, data.val_fraction), d.progress, d.nbytes, d.where)
                     for d, t in pairs)
        else:
            items = ((t, False, p, 0, "") for t, p in cache)
        added = 0
        for tokens, val, progress, nbytes, where in items:
            if val and not first:
                tally.progress = progress
                continue
            room = target - tally.taken
            if len(tokens) > room:  # this document crosses the target: cut it there
                tally.cut = where or "a document of a repeat pass"
                if tally.taken == 0:
                    _write_split_by_position(tokens[:room], tokenizer.bos_id, data.val_fraction, write, tally)
                else:
                    write("val" if val else "train", tokens[:room])
                    if val:
                        tally.val += room
                    else:
                        tally.train += room
                tally.progress = progress
                bar.advance(room)
                if first:
                    tally.bytes += nbytes
                    tally.count_document(where, room)
                _close(docs)
                break
            tally.progress = progress
            write("val" if val else "train", tokens)
            if val:
                tally.val += len(tokens)
            else:
                tally.train += len(tokens)
            added += len(tokens)
            bar.advance(len(tokens))
            if first:
                tally.bytes += nbytes
                tally.count_document(where, len(tokens))
                if not val and cache is not None:
                    cache.append((tokens, progress))
                    cached_tokens += len(tokens)
                    if cached_tokens > REPEAT_CACHE_TOKENS:
                        cache = None
            if tally.taken >= target:
                _close(docs)
                break
        else:  # the pass ran to its end
            tally.passes += 1
            tally.progress = 0.0
            source.stats.check_bad_fraction(source.name, data.max_bad_fraction)
            if first and not added:
                skipped = ", ".join(f"{k}: {v}" for k, v in sorted(source.stats.skipped.items()))
                raise SpudError(
                    f"source {source.name!r} has no usable documents (skipped: {skipped or 'none'}); "
                    "check its path/field, or remove it from data.sources"
                )
            if not added:
                log(f"source {source.name!r}: all its documents are in val, nothing to repeat; "
                    f"it stops at {tally.taken:,} of {target:,} target tokens")
                break
    source.stats.check_bad_fraction(source.name, data.max_bad_fraction)
    bar.flush()
    report = _report(source, tally)
    report["warnings"] = _warnings(source, tally, data.val_fraction)
    for w in report["warnings"]:
        log(f"warning: {w}")
    return report


def _write_split_by_position(tokens: np.ndarray, bos: int, val_fraction: float, write: WriteTokens,
                             tally: _Tally) -> None:
    """The first document alone fills the budget: hashing it whole would put the entire source in
    one split, so its last val_fraction goes to val (as a document of its own, after a BOS)."""
    n_val = round(len(tokens) * val_fraction)
    if n_val < 2:  # a BOS and at least one token, or nothing
        write("train", tokens)
        tally.train += len(tokens)
        return
    keep = len(tokens) - n_val
    write("train", tokens[:keep])
    val = np.empty(n_val, dtype=tokens.dtype)
    val[0] = bos
    val[1:] = tokens[keep:keep + n_val - 1]
    write("val", val)
    tally.train += keep
    tally.val += n_val


def _warnings(source: Source, tally: _Tally, val_fraction: float) -> list[str]:
    """What a user should know about a source's share; also written to the manifest."""
    out = []
    if tally.first_pass_tokens and tally.largest_tokens > DOMINANT_SHARE * tally.first_pass_tokens:
        share = tally.largest_tokens / tally.first_pass_tokens
        pieces = (f"; it is longer than {MAX_DOCUMENT_BYTES >> 20} MiB and was read in pieces"
                  if source.stats.split_documents else "")
        out.append(
            f"source {source.name!r}: one document ({tally.largest}) supplies {share:.0%} of its "
            f"{tally.first_pass_tokens:,} distinct tokens{pieces}. Its text is not shuffled with others; if it is a "
            "collection, split it (split: blank_lines, or one file per document)"
        )
    if val_fraction > 0 and tally.val == 0 and tally.taken:
        out.append(
            f"source {source.name!r} has no validation tokens: none of its {tally.documents:,} "
            f"documents fell into the val split (val_fraction={val_fraction}; a document is in val "
            "when the hash of its text is, so a source of few documents may have none)"
        )
    return out


def _report(source: Source, tally: _Tally) -> dict:
    cfg = source.cfg
    if source.infinite:
        epochs = 0.0  # an endless stream is never exhausted; no document is seen twice
    elif math.isnan(tally.progress):
        epochs = float(tally.passes)  # hf streams: size unknown until a pass ends
    else:
        epochs = tally.passes + tally.progress
    return {
        "name": source.name,
        "type": cfg.type,
        "origin": cfg.builtin or cfg.path or cfg.hf_name,
        "weight": cfg.weight,
        "target_tokens": tally.target,
        "train_tokens": tally.train,
        "val_tokens": tally.val,
        "documents": tally.documents,
        "bytes": tally.bytes,
        "cut_document": tally.cut,
        "largest_document": {"where": tally.largest, "tokens": tally.largest_tokens},
        "epochs": round(epochs, 4),
        "exhausted": tally.passes > 0 or tally.progress >= 1.0,
        "infinite": source.infinite,
        **source.stats.to_dict(),
        **({"cleaning": source.cleaner.stats()} if source.cleaner is not None else {}),
    }


def mix_tokens(
    cfg: Config, tokenizer: Tokenizer, write: WriteTokens, progress: bool = True,
    log: Callable[[str], None] = print, sources: list[Source] | None = None, ran: dict | None = None,
) -> list[dict]:
    """Tokenize every source up to its target, handing tokens to `write(split, tokens)`.
    Returns one accounting dict per source (the manifest's `sources`); `ran` gets the number of
    worker processes used (spud.data.workers)."""
    from spud.data.workers import PreparePool, resolve_workers  # noqa: PLC0415

    sources = sources if sources is not None else open_sources(cfg)
    targets = token_targets(cfg.data)
    cleaning = any(s.cleaner is not None for s in sources)
    workers = resolve_workers(cfg.data.workers, cleaning, cfg.data.total_tokens)
    # Only a real tokenizer goes to workers (a merge's replay encoder hands out stored tokens).
    pool = PreparePool(workers, tokenizer, sources) if workers > 1 and isinstance(tokenizer, Tokenizer) else None
    if ran is not None:
        ran["workers"] = workers if pool is not None else 1
    reports = []
    try:
        if pool is not None:
            pool.attach(sources)
        with TokenBar(progress, sum(targets)) as bar:
            for source, target in zip(sources, targets):
                bar.describe(source.name)
                reports.append(_mix_source(source, target, tokenizer, cfg.data, write, bar, log))
    except BaseException:
        if pool is not None:
            pool.terminate()
        raise
    finally:
        for s in sources:
            s.prepare = None
    if pool is not None:
        pool.close()
        if ran is not None:
            ran["workers_peak_rss_mb"] = round(pool.peak_rss_mb, 1)
    return reports


# ------------------------------------------------------------------------ tokenizer training
def sample_texts_for_tokenizer(cfg: Config) -> Iterator[str]:
    """Documents from all sources, interleaved by weight, until `tokenizer.train_bytes` UTF-8
    bytes are out. Deterministic: the next document always comes from the source furthest below
    its weighted share of bytes (ties → the earlier source). A finite source that runs out is
    dropped rather than repeated: repeats would skew BPE counts without adding any new text."""
    sources = open_sources(cfg)
    streams = [s.documents() for s in sources]
    weights = [s.cfg.weight for s in sources]
    sent = [0] * len(sources)
    active = list(range(len(sources)))
    total, budget = 0, cfg.tokenizer.train_bytes
    while total < budget and active:
        i = min(active, key=lambda j: (sent[j] / weights[j], j))
        doc = next(streams[i], None)
        if doc is None:
            active.remove(i)
            continue
        sent[i] += doc.nbytes
        total += doc.nbytes
        yield doc.text
