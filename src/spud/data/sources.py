"""Document sources: turn one `SourceConfig` into a stream of text documents, counting what is
skipped and why.

All sources are validated up front by `open_sources` (paths exist and are readable, parquet files
have the column, builtin names exist, `datasets` is importable) so that a typo in the fifth
source fails before the tokenizer trains for ten minutes on the first four.

A `Source` can be read several times (`documents()` starts a new pass each call): the mix repeats
small sources. Skip counts and file lists are recorded on the first pass only, since every later
pass reads exactly the same records. How each type is read is in source_readers.py.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from spud.config import Config, SourceConfig
from spud.data import builtin
from spud.data.clean import attach_cleaning
from spud.data.records import (
    MAX_DOCUMENT_BYTES,
    SourceStats,
    encodable_part,
    nontext_reason,
    text_pieces,
)
from spud.data.source_readers import _HF_HINT, SourceReaders
from spud.errors import SpudError

__all__ = ["Document", "Source", "SourceStats", "open_sources", "source_seed"]

FILE_SUFFIXES = {"text": (".txt", ".md"), "jsonl": (".jsonl",), "parquet": (".parquet",)}


class Document(NamedTuple):
    text: str
    nbytes: int  # UTF-8 length of text
    progress: float  # share of one pass of the source read once this document is in; nan: unknown
    where: str = ""  # file, file:line, ...; the pieces of one long document share it
    tokens: object = None  # [BOS, ids...] (uint32) when a worker process already encoded it


def source_seed(seed: int, name: str) -> int:
    """Per-source seed: two generators in one mix never share a stream, and renaming a source
    changes its text (on purpose: the name is its identity in the manifest)."""
    digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class Source(SourceReaders):
    """One validated source. `documents()` yields one full pass (or up to `max_documents`)."""

    def __init__(self, cfg: SourceConfig, seed: int, files: list[Path], total_units: int):
        self.cfg = cfg
        self.name = cfg.name
        self.seed = seed
        self.files = files
        self.total_units = max(total_units, 1)  # bytes (files) or rows (parquet), for progress
        self.stats = SourceStats()
        self.generated = cfg.type == "builtin" and cfg.builtin in builtin.GENERATED
        self.infinite = self.generated and not cfg.max_documents
        self._passes = 0
        self.cleaner = None  # spud.data.clean.DocumentFilter, set by open_sources when configured
        self.prepare = None  # spud.data.workers: reads ahead, rules/hashes/tokens in worker processes

    def fingerprint(self) -> list:
        """What the source's content depends on, cheaply (stat, not read): a changed file or
        another Python's stdlib makes a previously built dataset stale."""
        c = self.cfg
        stat = [[str(p), s.st_size, s.st_mtime_ns] for p in self.files for s in [p.stat()]]
        extra = [sys.version] if c.type == "builtin" else []
        if self.generated:
            extra = [builtin.GENERATOR_VERSION, self.seed]
        return [c.model_dump(mode="json"), stat, extra]

    def documents(self) -> Iterator[Document]:
        # Later passes see the same records; a throwaway stats object keeps counts per-pass.
        stats = self.stats if self._passes == 0 else SourceStats()
        self._passes += 1
        cap = self.cfg.max_documents
        count = 0
        last_where, dropped, split = None, None, None
        judged = 0  # records judged by the cleaner this pass (its decisions are replayed by index)
        if self.prepare is not None:
            records = self.prepare(self._read, stats, self._passes == 1)
        else:
            records = ((text, progress, where, None) for text, progress, where in self._read(stats))
        for text, progress, where, prepared in records:
            piece = where == last_where  # a later piece of the same long (file) document
            last_where = where
            if cap and count >= cap and not piece:
                return
            if piece and where == dropped:  # the rest of a document judged not text
                continue
            if not piece:
                stats.records += 1
            if not text.strip():
                if not piece:
                    stats.skip("empty", where, "empty or whitespace-only document")
                continue
            if reason := nontext_reason(text):
                stats.skip("not_text", where, reason)
                dropped = where
                continue
            if self.cleaner is not None and not piece:
                verdict = self.cleaner.judge(text, where, judged, self._passes == 1, prepared)
                judged += 1
                if verdict is not None:
                    stats.skip(verdict[0], where, verdict[1])
                    dropped = where
                    continue
            parts = list(text_pieces(text, MAX_DOCUMENT_BYTES)) if len(text) > MAX_DOCUMENT_BYTES else [text]
            if (piece or len(parts) > 1) and split != where:
                stats.split_documents += 1
                split = where
            tokens = prepared.tokens if prepared is not None else None
            for k, part in enumerate(parts):
                part, nbytes, replaced = encodable_part(part)
                if replaced:
                    stats.utf8_replacements += replaced
                if not piece:
                    count += 1
                if cap:
                    progress = count / cap if math.isnan(progress) else max(progress, count / cap)
                yield Document(part, nbytes, min(progress, 1.0), where, tokens[k] if tokens else None)
                piece = True
            if cap and count >= cap and self.cfg.type != "text":  # text: its last file's pieces follow
                return


# ---------------------------------------------------------------------------------- validation
def _where(i: int, sc: SourceConfig) -> str:
    return f"data.sources[{i}] ({sc.name!r}, type {sc.type})"


def _resolve_files(sc: SourceConfig, where: str) -> list[Path]:
    path = Path(sc.path).expanduser()
    shown = str(path) if path.is_absolute() else f"{path} (relative to {Path.cwd()})"
    suffixes = FILE_SUFFIXES[sc.type]
    if not path.exists():
        raise SpudError(f"{where}: path {shown} does not exist; fix `path`")
    if path.is_dir():
        if not os.access(path, os.R_OK | os.X_OK):
            raise SpudError(f"{where}: directory {shown} is not readable (permissions)")
        # A broken symlink is kept so that it is reported below rather than silently dropped.
        found = [p for p in path.rglob("*") if p.suffix.lower() in suffixes and (p.is_file() or p.is_symlink())]
        files = sorted(found, key=lambda p: p.relative_to(path).as_posix())
        if not files:
            raise SpudError(f"{where}: directory {shown} has no {'/'.join(suffixes)} files")
    elif path.is_file():
        files = [path]
    else:
        raise SpudError(f"{where}: {shown} is neither a regular file nor a directory")
    for f in files:
        if f.is_symlink() and not f.exists():
            raise SpudError(f"{where}: {f} is a broken symbolic link (to {os.readlink(f)}); fix or remove it")
        if f.is_dir():
            continue  # a directory named like a file: rglob lists its contents separately
        try:
            with f.open("rb") as fh:
                fh.read(1)
        except OSError as e:
            raise SpudError(f"{where}: cannot read {f} ({e.strerror}); check its permissions") from None
    files = [f for f in files if f.is_file()]
    _check_not_all_empty(files, where)
    return files


def _check_not_all_empty(files: list[Path], where: str) -> None:
    """A source whose files hold no text at all fails now, naming them, instead of after the
    tokenizer has trained on the other sources. (Some empty files among others are skipped and
    counted in the manifest.) Only small files are read: a large one surely holds something."""
    for f in files:
        size = f.stat().st_size
        if size > 1 << 16 or (size and f.read_bytes().strip()):
            return
    names = ", ".join(str(f) for f in files[:5]) + (f" and {len(files) - 5} more" if len(files) > 5 else "")
    what = "the file is" if len(files) == 1 else f"all {len(files)} files are"
    raise SpudError(f"{where}: no text: {what} empty or whitespace-only ({names}); "
                    "fill it, or remove the source from data.sources")


def _parquet_rows(sc: SourceConfig, files: list[Path], where: str) -> int:
    """Check each file's schema (metadata only, cheap) and return the total row count."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = 0
    for f in files:
        try:
            meta = pq.ParquetFile(f)
            schema = meta.schema_arrow
        except Exception as e:  # pyarrow raises ArrowInvalid for non-parquet files
            raise SpudError(f"{where}: {f} is not a readable parquet file ({e})") from None
        if sc.field not in schema.names:
            raise SpudError(
                f"{where}: {f} has no column {sc.field!r}; its columns are: "
                f"{', '.join(schema.names)}. Set `field` to the text column."
            )
        kind = schema.field(sc.field).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise SpudError(f"{where}: column {sc.field!r} of {f} is {kind}, not a string column")
        rows += meta.metadata.num_rows
    return rows


def _validate(i: int, sc: SourceConfig, seed: int) -> Source:
    where = _where(i, sc)
    if sc.type in FILE_SUFFIXES:
        files = _resolve_files(sc, where)
        if sc.type == "parquet":
            return Source(sc, seed, files, _parquet_rows(sc, files, where))
        return Source(sc, seed, files, sum(f.stat().st_size for f in files))
    if sc.type == "builtin":
        if sc.builtin not in builtin.BUILTINS:
            raise SpudError(
                f"{where}: unknown builtin {sc.builtin!r}; the builtins are: {', '.join(builtin.BUILTINS)}"
            )
        if sc.builtin in builtin.GENERATED:
            return Source(sc, seed, [], 0)
        files = builtin.stdlib_files()
        if not files:
            raise SpudError(f"{where}: found no Python sources under {builtin.stdlib_root()}")
        return Source(sc, seed, files, sum(f.stat().st_size for f in files))
    try:  # hf: fail now rather than after the other sources were tokenized
        import datasets  # noqa: F401
    except ImportError:
        raise SpudError(
            f"{where}: type hf needs the `datasets` package (pip install datasets). {_HF_HINT}"
        ) from None
    return Source(sc, seed, [], 0)


def open_sources(cfg: Config) -> list[Source]:
    """Validate every source (all problems reported at once) and return them ready to read."""
    sources, problems, seen = [], [], set()
    if not cfg.data.sources:
        raise SpudError("data.sources is empty: add at least one source (e.g. a builtin one)")
    for i, sc in enumerate(cfg.data.sources):
        if sc.name in seen:
            problems.append(f"{_where(i, sc)}: duplicate source name {sc.name!r}; names must be unique")
            continue
        seen.add(sc.name)
        try:
            sources.append(_validate(i, sc, source_seed(cfg.seed, sc.name)))
        except SpudError as e:
            problems.append(str(e))
    if problems:
        raise SpudError("invalid data sources:\n  " + "\n  ".join(problems))
    attach_cleaning(cfg, sources)
    return sources
