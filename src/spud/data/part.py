"""Part i of N of a sharded build (`spud data build CONFIG --shard i/N --out DIR`): the reading,
rules, hashing and tokenization of every N-th input file, as an event log + token file per source
that `spud.data.merge` replays. See spud.data.merge for the design and why it is exact."""

from __future__ import annotations

import base64
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from spud.config import Config
from spud.data.records import SourceStats
from spud.data.sources import Source, open_sources
from spud.errors import SpudError

PART_FILE = "part.json"
PART_VERSION = 1
_TOKENS = np.dtype("<u4")
ENCODE_BATCH_BYTES = 2 << 20


def parse_shard(spec: str, flag: str = "--shard") -> tuple[int, int]:
    """"i/N" → (i, N) with 0 <= i < N (numbered from 0, like Slurm's --array=0-(N-1)). `flag` names
    the option in the error (`spud mix search --worker` takes the same form)."""
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise SpudError(f"{flag} {spec!r}: expected i/N, e.g. {flag} 0/4 (part 0 of 4)") from None
    if n < 1 or not 0 <= i < n:
        raise SpudError(f"{flag} {spec}: i must be in 0..N-1 and N >= 1 (numbered from 0; "
                        f"with N={n} they are 0/{n} … {max(n - 1, 0)}/{n})")
    return i, n


def split_by_part(source: Source) -> bool:
    """File-backed sources are split across parts; hf and generated ones are read by the merge."""
    return bool(source.files) and not source.generated


# ------------------------------------------------------------------------------ writing a part
class _RecordingStats:
    """A SourceStats that logs every change as an event (deltas, so parts can be summed)."""

    def __init__(self, events: list):
        object.__setattr__(self, "_inner", SourceStats())
        object.__setattr__(self, "_events", events)

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def __setattr__(self, name, value):
        self._events.append(["s", name, value - getattr(self._inner, name)])
        setattr(self._inner, name, value)

    def skip(self, reason: str, where: str, detail: str, bad: bool = False) -> None:
        self._events.append(["k", reason, where, detail, bad])
        self._inner.skip(reason, where, detail, bad)

    def file_read(self, name: str) -> None:
        self._events.append(["f", name])
        self._inner.file_read(name)


class _HashRecorder:
    """Stands in for the Deduplicator in a part: logs the document's dedup keys, keeps it."""

    def __init__(self, dedup, events: list):
        self.dedup, self.events = dedup, events

    def check(self, text: str, source: str = "") -> None:
        content_hash_hex = None
        if self.dedup.cfg.exact:
            from spud.data.dedup import content_hash  # noqa: PLC0415

            content_hash_hex = content_hash(text).hex()
        sig = None
        if self.dedup.cfg.near:
            sig = base64.b64encode(self.dedup.signature(text).__getstate__()).decode("ascii")
        self.events.append(["j", content_hash_hex, sig, len(text.encode("utf-8", "replace"))])
        return None


class _LoggedQuality:
    """Wraps a source's QualityFilter in a part: logs each drop (rule, bytes) for the merge."""

    def __init__(self, quality, events: list):
        self.quality, self.events = quality, events

    def __call__(self, doc: str):
        verdict = self.quality(doc)
        if verdict is not None:
            self.events.append(["q", verdict[0], len(doc.encode("utf-8", "replace"))])
        return verdict


def _record_file(source: Source, path: Path, tokenizer, val_fraction: float, events_out,
                 tokens_out) -> int:
    """One input file of a source through the build's reader and rules; returns tokens written."""
    from spud.data.mix import is_val_document  # noqa: PLC0415

    events: list = []
    source.files, source._passes = [path], 0
    source.stats = _RecordingStats(events)
    cleaner = source.cleaner
    if cleaner is not None:  # fresh loggers per file; the originals are kept underneath
        quality, dedup = getattr(cleaner, "_part_originals", (cleaner.quality, cleaner.dedup))
        cleaner._part_originals = (quality, dedup)
        cleaner.quality = _LoggedQuality(quality, events) if quality is not None else None
        cleaner.dedup = _HashRecorder(dedup, events) if dedup is not None else None
    read = Source._read.__get__(source)

    def marked(stats):  # "R" before each record is read, "r" once it is: splits read-time events
        it = read(stats)
        while True:
            events.append(["R"])
            item = next(it, None)
            if item is None:
                return
            events.append(["r", item[2]])
            yield item

    source._read = marked
    written, batch, size = 0, [], 0

    def flush():
        nonlocal written, batch, size
        docs = [d for d, _ in batch]
        for (doc, ev), ids in zip(batch, tokenizer.encode_batch([d.text for d in docs])):
            arr = np.asarray(ids, dtype=_TOKENS)
            tokens_out.write(arr.tobytes())
            ev[5] = len(arr)
            written += len(arr)
        batch, size = [], 0

    pending = 0
    for doc in source.documents():
        units = round(doc.progress * source.total_units)
        ev = ["d", doc.nbytes, units, doc.where, is_val_document(doc.text, val_fraction), None]
        events.append(ev)
        batch.append((doc, ev))
        size += doc.nbytes
        if size >= ENCODE_BATCH_BYTES:
            flush()
            for e in events[pending:]:
                events_out.write(json.dumps(e) + "\n")
            pending = len(events)
    flush()
    for e in events[pending:]:
        events_out.write(json.dumps(e) + "\n")
    del source._read
    return written


def _identity(cfg: Config) -> dict:
    data = cfg.data.model_dump(mode="json")
    data.pop("workers", None)
    return {"data": data, "seed": cfg.seed, "tokenizer": cfg.tokenizer.model_dump(mode="json")}


def build_part(cfg: Config, out: str | Path, shard: str, log: Callable[[str], None] = print) -> dict:
    """Write part i of N of the dataset into `out/part/` (atomically); returns part.json."""
    from spud.data.build import _inputs_fingerprint, _load_or_train_tokenizer  # noqa: PLC0415

    i, n = parse_shard(shard)
    sources = open_sources(cfg)
    fingerprint = _inputs_fingerprint(sources)  # now: the parts below narrow source.files
    capped = [s.name for s in sources if split_by_part(s) and s.cfg.max_documents]
    if capped:
        raise SpudError(f"--shard: source(s) {', '.join(capped)} set max_documents, which counts a "
                        "whole source's documents; remove it or build without --shard")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _load_or_train_tokenizer(cfg, out, log)
    staging = out / "part.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    listing = []
    for k, source in enumerate(sources):
        if not split_by_part(source):
            listing.append({"name": source.name, "files": [], "tokens": 0})
            continue
        mine = [(j, p) for j, p in enumerate(source.files) if j % n == i]
        tokens = 0
        with (staging / f"src{k}.events").open("w", encoding="utf-8") as ev, \
                (staging / f"src{k}.tokens").open("wb") as tok:
            for j, path in mine:
                ev.write(json.dumps(["F", j]) + "\n")
                tokens += _record_file(source, path, tokenizer, cfg.data.val_fraction, ev, tok)
        listing.append({"name": source.name, "files": [j for j, _ in mine], "tokens": tokens})
        log(f"part {i}/{n}: source {source.name!r}: {len(mine)} of {len(source.files)} files, {tokens:,} tokens")
    part = {"part_version": PART_VERSION, "shard": [i, n], "config": cfg.model_dump(mode="json"),
            "identity": _identity(cfg), "tokenizer_sha256": tokenizer.sha256(),
            "inputs_fingerprint": fingerprint, "sources": listing}
    (staging / PART_FILE).write_text(json.dumps(part, indent=1), encoding="utf-8")
    final = out / "part"
    shutil.rmtree(final, ignore_errors=True)
    staging.rename(final)
    return part
