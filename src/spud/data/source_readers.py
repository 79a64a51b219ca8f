"""How each source type is read: text, jsonl, parquet, stdlib, Hugging Face → (text, progress, where)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

from spud.data import builtin
from spud.data.records import (
    MAX_DOCUMENT_BYTES,
    SourceStats,
    decode_utf8,
    file_pieces,
    record_text,
)
from spud.errors import SpudError

PARQUET_BATCH_ROWS = 1024  # rows per pyarrow batch: bounded memory however large the file
_HF_HINT = (
    "hf sources also need network access; offline, download the dataset once elsewhere, save it "
    "as jsonl or parquet, and use a source of type jsonl or parquet instead."
)


class SourceReaders:
    """Mixed into sources.Source, whose cfg, files, seed, name and total_units these use."""

    def _read(self, stats: SourceStats) -> Iterator[tuple[str, float, str]]:
        """(text, progress, where) for every record, empty ones included."""
        c = self.cfg
        if self.generated:
            docs = builtin.generated_documents(c.builtin, self.seed)
            return ((t, math.nan, f"{c.builtin}#{i}") for i, t in enumerate(docs, 1))
        readers = {"text": self._read_text, "jsonl": self._read_jsonl, "parquet": self._read_parquet,
                   "hf": self._read_hf, "builtin": self._read_stdlib}
        return readers[c.type](stats)

    def _open(self, path: Path):
        try:
            return path.open("rb")
        except OSError as e:  # validated before, so it vanished or changed permissions since
            raise SpudError(f"source {self.name!r}: cannot read {path} ({e.strerror})") from None

    def _read_text(self, stats: SourceStats) -> Iterator[tuple[str, float, str]]:
        done = 0
        for path in self.files:
            stats.file_read(str(path))
            with self._open(path) as f:
                if self.cfg.split == "file":  # in pieces: a 10 GB file is never in memory at once
                    found = False
                    for i, raw in enumerate(file_pieces(f, MAX_DOCUMENT_BYTES)):
                        done += len(raw)
                        found = True
                        text = decode_utf8(raw, stats)
                        yield (text.removeprefix("\ufeff") if i == 0 else text), done / self.total_units, str(path)
                    if not found:
                        yield "", done / self.total_units, str(path)
                    continue
                # blank_lines: a paragraph ends at a line that is empty or only whitespace.
                lines: list[str] = []
                start, found = 1, False
                for lineno, raw in enumerate(f, 1):
                    done += len(raw)
                    line = decode_utf8(raw, stats).removeprefix("\ufeff" if lineno == 1 else "")
                    if line.strip():
                        if not lines:
                            start = lineno
                        lines.append(line)
                    elif lines:
                        found = True
                        yield "".join(lines).rstrip("\r\n"), done / self.total_units, f"{path}:{start}"
                        lines = []
                if lines:
                    found = True
                    yield "".join(lines).rstrip("\r\n"), done / self.total_units, f"{path}:{start}"
                if not found:  # whole file blank: surfaces as one skipped empty document
                    yield "", done / self.total_units, str(path)

    def _read_jsonl(self, stats: SourceStats) -> Iterator[tuple[str, float, str]]:
        done = 0
        for path in self.files:
            stats.file_read(str(path))
            with self._open(path) as f:
                for lineno, raw in enumerate(f, 1):
                    done += len(raw)
                    # A BOM (some Windows editors write one) would make line 1 invalid JSON.
                    line = decode_utf8(raw, stats).removeprefix("\ufeff" if lineno == 1 else "")
                    if not line.strip():  # blank lines are formatting, not records: counted apart
                        stats.blank_lines += 1
                        continue
                    where = f"{path}:{lineno}"
                    try:
                        obj = json.loads(line)
                    except ValueError as e:
                        stats.skip("invalid_json", where, f"not valid JSON ({e})", bad=True)
                        continue
                    text = record_text(obj, self.cfg.field, where, stats)
                    if text is not None:
                        yield text, done / self.total_units, where

    def _read_parquet(self, stats: SourceStats) -> Iterator[tuple[str, float, str]]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        column, done = self.cfg.field, 0
        for path in self.files:
            stats.file_read(str(path))
            row = 0
            try:
                batches = pq.ParquetFile(path).iter_batches(
                    batch_size=PARQUET_BATCH_ROWS, columns=[column]
                )
                for batch in batches:
                    for value in batch.column(0).to_pylist():
                        row += 1
                        done += 1
                        if value is None:
                            stats.skip("null", f"{path}:row {row}", f"column {column!r} is null", bad=True)
                            continue
                        yield value, done / self.total_units, f"{path}:row {row}"
            except (OSError, pa.ArrowException) as e:  # truncated or changed since validation
                raise SpudError(f"source {self.name!r}: reading {path} failed at row {row} ({e})") from None

    def _read_stdlib(self, stats: SourceStats) -> Iterator[tuple[str, float, str]]:
        root, done = builtin.stdlib_root(), 0
        want_docs = self.cfg.builtin == "stdlib_docs"
        for path in self.files:
            rel = path.relative_to(root).as_posix()
            stats.file_read(rel)
            with self._open(path) as f:
                raw = f.read()
            done += len(raw)
            text = decode_utf8(raw, stats)
            if not want_docs:
                yield text, done / self.total_units, rel
                continue
            docs = builtin.docstring_documents(text, builtin.module_name(path))
            if docs is None:
                stats.skip("syntax_error", rel, "does not parse as Python")
                continue
            for k, doc in enumerate(docs or [""], 1):  # "" is then skipped and counted as empty
                yield doc, done / self.total_units, f"{rel}#{k}"

    def _read_hf(self, stats: SourceStats) -> Iterator[tuple[str, float, str]]:
        c = self.cfg
        try:
            import datasets
        except ImportError:
            msg = f"source {self.name!r}: type hf needs the `datasets` package. {_HF_HINT}"
            raise SpudError(msg) from None
        rows = 0
        try:
            stream = datasets.load_dataset(c.hf_name, c.hf_config, split=c.hf_split, streaming=True)
            for row in stream:
                rows += 1
                where = f"{c.hf_name}:{rows}"
                text = record_text(row, c.field, where, stats)
                if text is not None:
                    yield text, math.nan, where
        except SpudError:
            raise
        except Exception as e:  # datasets raises many types (ConnectionError, HFValidationError, ...)
            raise SpudError(
                f"source {self.name!r}: Hugging Face dataset {c.hf_name!r} (config {c.hf_config!r}, "
                f"split {c.hf_split!r}) failed after {rows} rows: {type(e).__name__}: {e}. {_HF_HINT}"
            ) from None
