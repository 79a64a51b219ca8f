"""Builds larger than one machine: `spud data build CONFIG --shard i/N --out PART` writes part i of
N, `spud data merge PART... --out RUN` joins the N parts into the dataset a single build makes —
the same manifest and byte-identical shards (`tests/data/test_data_merge.py` checks it).

What a part does (the expensive work: reading, decoding, quality rules, MinHash hashing,
tokenization) and what the merge does (the cheap, order-dependent work: dedup decisions and the
mix budget) follow from what a single build's result depends on:

- A part takes every N-th input file of each file-backed source (file j → part j mod N), reads
  each file exactly as a build does and records an *event log*: every change to the source's
  statistics (records, skips and why, files read), the quality verdicts, for each document that
  passed the rules its dedup keys (normalised-content hash, MinHash signature), and for each
  document piece its tokens (`srcK.tokens`), size, split and position. It decides no duplicates:
  whether a document is a duplicate depends on every document before it, in every part.
- The merge replays the logs in the single build's order (source by source, file by file,
  taking file j from part j mod N) through one deduplicator and the ordinary mix
  (`spud.data.mix`): budgets, repeats, cuts and shard writing are the build's own code, fed the
  parts' tokens instead of re-tokenizing. Because the replay is lazy, a source cut by its budget
  stops being replayed exactly where a build stops reading it, so even the dedup index (which
  later sources are checked against) is the same.

Limits: Hugging Face and generated builtin sources have no files to split; the merge reads those
itself. `max_documents` counts documents across a whole source, so a file-backed source with it is
refused under --shard. Part directories are scratch: delete them after the merge. The
`spud data inspect` samples of a merged build show the merge's dedup decisions only as counts.
"""
from __future__ import annotations

import base64
import json
import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np

from spud.config import validate_config
from spud.data.part import _TOKENS, PART_FILE, PART_VERSION, build_part, parse_shard, split_by_part
from spud.data.records import SourceStats
from spud.data.sources import Source, open_sources
from spud.errors import SpudError

__all__ = ["build_part", "check_parts", "merge_parts", "parse_shard"]


# ------------------------------------------------------------------------------------ merging
def _read_part(path: Path) -> dict:
    f = Path(path) / "part" / PART_FILE
    if not f.is_file():
        raise SpudError(f"{path}: no {Path('part') / PART_FILE}; is it the --out of "
                        "`spud data build CONFIG --shard i/N --out DIR`, and did that finish?")
    try:
        part = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SpudError(f"{f} is unreadable ({e}); rebuild that part") from None
    if part.get("part_version") != PART_VERSION:
        raise SpudError(f"{f}: part format {part.get('part_version')}, this spud merges {PART_VERSION}; rebuild it")
    return part


def _first_difference(a, b, where: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if (d := _first_difference(a.get(k), b.get(k), f"{where}.{k}" if where else k)) is not None:
                return d
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            if (d := _first_difference(x, y, f"{where}[{i}]")) is not None:
                return d
        return None
    return None if a == b else f"{where}: {a!r} vs {b!r}"


def check_parts(paths: list[Path]) -> list[dict]:
    """All parts readable, built from one config, tokenizer and inputs, each of 0..N-1 once;
    SpudError naming the first difference otherwise. Returns the parts in shard order."""
    if not paths:
        raise SpudError("spud data merge: give the part directories (the --out of each --shard build)")
    parts = [_read_part(p) for p in paths]
    first, name0 = parts[0], paths[0]
    for part, path in zip(parts[1:], paths[1:]):
        if (d := _first_difference(first["identity"], part["identity"])) is not None:
            raise SpudError(f"parts {name0} and {path} were built with different configs ({d}); "
                            "rebuild them from one config")
        if part["tokenizer_sha256"] != first["tokenizer_sha256"]:
            raise SpudError(f"parts {name0} and {path} were built with different tokenizers "
                            f"(tokenizer.json sha256 {first['tokenizer_sha256'][:12]}… vs "
                            f"{part['tokenizer_sha256'][:12]}…); put one tokenizer.json into every part "
                            "directory before building (`spud tokenizer train CONFIG --out DIR`)")
        if part["inputs_fingerprint"] != first["inputs_fingerprint"]:
            raise SpudError(f"parts {name0} and {path} saw different input files (sizes or "
                            "modification times differ); rebuild the parts from the same inputs")
        if part["shard"][1] != first["shard"][1]:
            raise SpudError(f"{name0} is a part of {first['shard'][1]}, {path} of {part['shard'][1]}")
    n = first["shard"][1]
    by_index = {}
    for part, path in zip(parts, paths):
        i = part["shard"][0]
        if i in by_index:
            raise SpudError(f"{by_index[i][1]} and {path} are both part {i}/{n}; give each part once")
        by_index[i] = (part, path)
    missing = [f"{i}/{n}" for i in range(n) if i not in by_index]
    if missing:
        raise SpudError(f"missing part(s) {', '.join(missing)}: all {n} parts are needed")
    return [by_index[i][0] | {"dir": str(by_index[i][1])} for i in range(n)]


class _Tokens(str):
    """A replayed document's "text": carries the token ids its part already computed."""

    ids: np.ndarray


class ReplayDocument(NamedTuple):
    text: _Tokens
    nbytes: int
    progress: float
    where: str
    val: bool  # computed by the part from the text (mix._in_val reads it)


class ReplayEncoder:
    """The tokenizer the mix sees during a merge: replayed documents come pre-tokenized, the
    sources the merge reads itself (hf, generated) go to the real tokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer, self.bos_id, self.vocab_size = tokenizer, tokenizer.bos_id, tokenizer.vocab_size

    def encode_batch(self, texts):
        if texts and isinstance(texts[0], _Tokens):
            return [t.ids for t in texts]
        return self.tokenizer.encode_batch(texts)


class _ReplayCleaner:
    def __init__(self, name: str, has_quality: bool, dedup):
        self.name, self.has_quality, self.dedup = name, has_quality, dedup
        self.dropped: Counter = Counter()
        self.dropped_bytes: Counter = Counter()
        self.examples: dict = {}  # document texts stay in the parts: no inspect samples
        self.kept: list = []

    def stats(self) -> dict:
        quality = ({r: {"documents": self.dropped[r], "bytes": self.dropped_bytes[r]} for r in sorted(self.dropped)}
                   if self.has_quality else {})
        out = {"quality": quality}
        if self.dedup is not None:
            out["dedup"] = self.dedup.stats(self.name)
        return out


class ReplaySource:
    """A file-backed source rebuilt from its parts' event logs; quacks like `Source` for the mix."""

    def __init__(self, source: Source, k: int, parts: list[dict]):
        self.cfg, self.name, self.files = source.cfg, source.name, source.files
        self.infinite, self.generated, self.total_units = False, False, source.total_units
        self.stats = SourceStats()
        c = source.cleaner
        self.cleaner = (_ReplayCleaner(self.name, c.quality is not None, c.dedup) if c is not None else None)
        self._k, self._parts, self._passes = k, parts, 0
        self._decisions: list[str | None] = []
        self._units = [_file_units(source, p) for p in source.files]

    def _events(self) -> Iterator[tuple[int, list, np.ndarray]]:
        """(file index, event, the part's token array) in the single build's file order."""
        n = len(self._parts)
        logs = [open(Path(p["dir"]) / "part" / f"src{self._k}.events", encoding="utf-8") for p in self._parts]
        tokens = [np.memmap(Path(p["dir"]) / "part" / f"src{self._k}.tokens", dtype=_TOKENS, mode="r")
                  if (Path(p["dir"]) / "part" / f"src{self._k}.tokens").stat().st_size else np.empty(0, _TOKENS)
                  for p in self._parts]
        heads = [None] * n  # the "F" line each log stopped at
        try:
            for j in range(len(self.files)):
                i = j % n
                line = heads[i] or logs[i].readline()
                if not line or json.loads(line) != ["F", j]:
                    raise SpudError(f"{self._parts[i]['dir']}: source {self.name!r} lacks file {j}; rebuild that part")
                heads[i] = None
                while (line := logs[i].readline()) and not line.startswith('["F"'):
                    yield j, json.loads(line), tokens[i]
                heads[i] = line or None
        finally:
            for f in logs:
                f.close()

    def documents(self) -> Iterator[ReplayDocument]:
        first = self._passes == 0
        self._passes += 1
        stats = self.stats if first else SourceStats()
        offsets = [0] * len(self._parts)
        prefix = np.cumsum([0, *self._units]).tolist()
        judged, where, last_where, dropped, skipping = 0, None, None, None, False
        for j, ev, tokens in self._events():
            kind, i = ev[0], j % len(self._parts)
            if kind == "d":  # tokens are consumed whether or not the document survives
                start = offsets[i]
                offsets[i] += ev[5]
            if kind == "R":
                skipping = False
            elif kind == "r":
                piece = ev[1] == last_where
                where = last_where = ev[1]
                skipping = piece and where == dropped
            elif skipping:
                continue
            elif kind == "s":
                setattr(stats, ev[1], getattr(stats, ev[1]) + ev[2])
            elif kind == "k":
                stats.skip(*ev[1:])
                if ev[1].startswith("quality:") or ev[1] == "not_text":
                    dropped = where
            elif kind == "f":
                stats.file_read(ev[1])
            elif kind == "q" and first:
                self.cleaner.dropped[ev[1]] += 1
                self.cleaner.dropped_bytes[ev[1]] += ev[2]
            elif kind == "j":
                if first:
                    h = bytes.fromhex(ev[1]) if ev[1] else None
                    dedup = self.cleaner.dedup
                    verdict = dedup.check_hashed(h, _signature(ev[2], dedup), ev[3], self.name)
                    self._decisions.append(verdict)
                else:
                    verdict = self._decisions[judged]
                judged += 1
                if verdict is not None:
                    detail = f"{verdict} duplicate of an earlier document" if first else "as on the first pass"
                    stats.skip(f"duplicate:{verdict}", where, detail)
                    dropped, skipping = where, True
            elif kind == "d":
                text = _Tokens("")
                text.ids = tokens[start:start + ev[5]]
                yield ReplayDocument(text, ev[1], (prefix[j] + ev[2]) / self.total_units, ev[3], ev[4])


def _signature(state: str | None, dedup):
    if state is None:
        return None
    from rensa import RMinHash  # noqa: PLC0415

    m = RMinHash(dedup.cfg.num_perm, dedup.cfg.seed)
    m.__setstate__(base64.b64decode(state))  # rensa's own serialisation (Rust), not a pickle
    return m


def _file_units(source: Source, path: Path) -> int:
    """What a file adds to a source's progress counter: rows (parquet) or bytes."""
    if source.cfg.type == "parquet":
        import pyarrow.parquet as pq  # noqa: PLC0415

        return pq.ParquetFile(path).metadata.num_rows
    return path.stat().st_size


def merge_parts(paths: list[str | Path], out: str | Path, progress: bool = True,
                log: Callable[[str], None] = print) -> dict:
    """Join the parts of a sharded build into `out/data/` (and `out/tokenizer.json`)."""
    from spud.data.build import _inputs_fingerprint, write_dataset  # noqa: PLC0415
    from spud.tokenizer import Tokenizer  # noqa: PLC0415

    paths = [Path(p) for p in paths]
    parts = check_parts(paths)
    cfg = validate_config(parts[0]["config"])
    sources = open_sources(cfg)
    fingerprint = _inputs_fingerprint(sources)
    if fingerprint != parts[0]["inputs_fingerprint"]:
        raise SpudError("the input files changed since the parts were built (sizes or modification "
                        "times differ); rebuild the parts")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(parts[0]["dir"]) / "tokenizer.json", out / "tokenizer.json")
    tokenizer = Tokenizer.load(out / "tokenizer.json")
    mixed = [ReplaySource(s, k, parts) if split_by_part(s) else s for k, s in enumerate(sources)]
    manifest = write_dataset(cfg, out, tokenizer, mixed, fingerprint, progress, log,
                             encoder=ReplayEncoder(tokenizer))
    return manifest
