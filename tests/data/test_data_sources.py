"""Each source type, and every kind of bad input: skipped and counted, or a SpudError up front."""

from __future__ import annotations

import sys
import types

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data_helpers import make_cfg, read_source, write_jsonl

from spud.data.sources import open_sources
from spud.errors import SpudError


# ---------------------------------------------------------------------------------------- text
def test_text_directory_is_recursive_sorted_and_filtered(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.txt").write_text("third")
    (tmp_path / "a.md").write_text("first")
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "ignored.json").write_text("not text")
    docs, stats = read_source({"name": "t", "type": "text", "path": str(tmp_path)})
    assert docs == ["first", "second", "third"]  # a.md, b.txt, b/z.txt
    assert stats.files_count == 3 and stats.files[-1].endswith("z.txt")


def test_text_blank_line_split(tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text("para one\nstill one\n\n\n  \npara two\n\npara three\n")
    docs, _ = read_source({"name": "t", "type": "text", "path": str(path), "split": "blank_lines"})
    assert docs == ["para one\nstill one", "para two", "para three"]


def test_text_single_file_keeps_whole_file(tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text("a\n\nb\n")
    docs, _ = read_source({"name": "t", "type": "text", "path": str(path)})
    assert docs == ["a\n\nb\n"]


def test_empty_files_are_skipped_and_counted(tmp_path):
    (tmp_path / "a.txt").write_text("real text")
    (tmp_path / "b.txt").write_text("")
    (tmp_path / "c.txt").write_text("  \n\t\n")
    for split in ("file", "blank_lines"):
        docs, stats = read_source({"name": "t", "type": "text", "path": str(tmp_path), "split": split})
        assert docs == ["real text"]
        assert stats.skipped == {"empty": 2}
        assert any("b.txt" in e for e in stats.skipped_examples)
        assert stats.bad_records == 0  # empty is not malformed


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
    # Two invalid sequences, plus one legitimate encoded U+FFFD that must not be counted; enough
    # ordinary text around them that the document stays below the non-text threshold (10%).
    (tmp_path / "a.txt").write_bytes(b"caf\xe9 ok \xff\xfe! " + "\ufffd".encode()
                                     + b" and then a good deal of ordinary text follows.")
    docs, stats = read_source({"name": "t", "type": "text", "path": str(tmp_path)})
    assert docs[0].startswith("caf\ufffd ok ")
    assert stats.utf8_replacements == 3  # \xe9 → 1, \xff\xfe → 2


def test_max_documents_caps_reading(tmp_path):
    (tmp_path / "a.txt").write_text("\n\n".join(f"para {i}" for i in range(10)))
    docs, _ = read_source({"name": "t", "type": "text", "path": str(tmp_path),
                           "split": "blank_lines", "max_documents": 4})
    assert docs == ["para 0", "para 1", "para 2", "para 3"]


# --------------------------------------------------------------------------------------- jsonl
def test_jsonl_bad_lines_are_skipped_with_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"text": "good one"},
        "{not json",
        [1, 2],
        {"body": "no text field"},
        {"text": 42},
        {"text": None},
        "",
        {"text": "good two", "extra": 1},
        {"text": "   "},
    ])
    docs, stats = read_source({"name": "j", "type": "jsonl", "path": str(path)})
    assert docs == ["good one", "good two"]
    assert stats.skipped == {"invalid_json": 1, "not_object": 1, "missing_field": 1,
                             "not_string": 1, "null": 1, "empty": 1}
    assert stats.bad_records == 5 and stats.records == 8  # the blank line is not a record
    assert stats.skipped_examples[0].startswith(f"{path}:2: not valid JSON")
    assert stats.skipped_examples[1] == f"{path}:3: a JSON array, not an object"
    assert f"{path}:4: no field 'text'" in stats.skipped_examples[2]


def test_jsonl_custom_field_and_invalid_utf8(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"content": "bad \xff byte"}\n{"content": "fine"}\n')
    docs, stats = read_source({"name": "j", "type": "jsonl", "path": str(path), "field": "content"})
    assert docs == ["bad \ufffd byte", "fine"]
    assert stats.utf8_replacements == 1


def test_byte_order_mark_is_dropped(tmp_path):
    (tmp_path / "d.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "one"}\n')
    (tmp_path / "d.txt").write_bytes(b"\xef\xbb\xbfpara\n\nnext\n")
    assert read_source({"name": "j", "type": "jsonl", "path": str(tmp_path)})[0] == ["one"]
    docs, _ = read_source({"name": "t", "type": "text", "path": str(tmp_path), "split": "blank_lines"})
    assert docs == ["para", "next"]


def test_jsonl_lone_surrogate_escape_is_replaced(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ['{"text": "a \\ud800 b"}'])
    docs, stats = read_source({"name": "j", "type": "jsonl", "path": str(path)})
    assert docs == ["a \ufffd b"] and stats.utf8_replacements == 1


# ------------------------------------------------------------------------------------- parquet
def test_parquet_reads_column_in_batches_and_counts_nulls(tmp_path, monkeypatch):
    values = [f"row {i}" if i % 10 else None for i in range(1, 101)]
    table = pa.table({"text": values, "id": list(range(100))})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=30)
    seen_batches = []
    real = pq.ParquetFile.iter_batches

    def spy(self, *args, **kwargs):
        assert kwargs["columns"] == ["text"]  # only the text column is read
        for batch in real(self, *args, **kwargs):
            seen_batches.append(batch.num_rows)
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    monkeypatch.setattr("spud.data.source_readers.PARQUET_BATCH_ROWS", 16)
    docs, stats = read_source({"name": "p", "type": "parquet", "path": str(tmp_path)})
    assert docs == [v for v in values if v is not None]
    assert max(seen_batches) <= 16 and len(seen_batches) > 1
    assert stats.skipped == {"null": 10} and stats.bad_records == 10
    assert stats.skipped_examples[0] == f"{tmp_path / 'a.parquet'}:row 10: column 'text' is null"


def test_parquet_missing_column_names_present_columns(tmp_path):
    pq.write_table(pa.table({"body": ["x"], "lang": ["en"]}), tmp_path / "a.parquet")
    with pytest.raises(SpudError, match=r"no column 'text'; its columns are: body, lang"):
        open_sources(make_cfg([{"name": "p", "type": "parquet", "path": str(tmp_path)}]))


def test_parquet_non_string_column_is_rejected(tmp_path):
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "a.parquet")
    with pytest.raises(SpudError, match="not a string column"):
        open_sources(make_cfg([{"name": "p", "type": "parquet", "path": str(tmp_path)}]))


def test_not_a_parquet_file(tmp_path):
    (tmp_path / "a.parquet").write_text("hello")
    with pytest.raises(SpudError, match="not a readable parquet file"):
        open_sources(make_cfg([{"name": "p", "type": "parquet", "path": str(tmp_path)}]))


# ---------------------------------------------------------------------------------- validation
def test_missing_paths_are_all_reported_by_name(tmp_path):
    cfg = make_cfg([
        {"name": "one", "type": "text", "path": str(tmp_path / "nope")},
        {"name": "two", "type": "jsonl", "path": str(tmp_path / "gone.jsonl")},
        {"name": "ok", "type": "builtin", "builtin": "arithmetic"},
    ])
    with pytest.raises(SpudError) as err:
        open_sources(cfg)
    msg = str(err.value)
    assert "data.sources[0] ('one'" in msg and "nope does not exist" in msg
    assert "data.sources[1] ('two'" in msg and "gone.jsonl does not exist" in msg


def test_directory_without_matching_files(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(SpudError, match=r"has no \.jsonl files"):
        open_sources(make_cfg([{"name": "j", "type": "jsonl", "path": str(tmp_path)}]))


def test_unreadable_file(tmp_path, monkeypatch):
    """Runs as root too (CI): the OS refusal is simulated at the one call that meets it. The
    other unreadable cases (broken link, file gone after validation) are in test_data_faults."""
    path = tmp_path / "a.txt"
    path.write_text("x")
    real_open = type(path).open

    def refuse(self, *args, **kwargs):
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(type(path), "open", refuse)
    with pytest.raises(SpudError) as e:
        open_sources(make_cfg([{"name": "t", "type": "text", "path": str(path)}]))
    assert str(e.value) == (f"invalid data sources:\n  data.sources[0] ('t', type text): cannot read {path} "
                            "(Permission denied); check its permissions")


def test_unknown_builtin_lists_builtins():
    with pytest.raises(SpudError, match="stdlib_docs, stdlib_code, arithmetic, reasoning"):
        open_sources(make_cfg([{"name": "b", "type": "builtin", "builtin": "wikipedia"}]))


def test_duplicate_names_and_empty_sources():
    twice = {"name": "x", "type": "builtin", "builtin": "arithmetic"}
    with pytest.raises(SpudError, match="duplicate source name 'x'"):
        open_sources(make_cfg([twice, twice]))
    with pytest.raises(SpudError, match="data.sources is empty"):
        open_sources(make_cfg([]))


def test_hf_without_datasets_says_what_to_do(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails even where it is installed
    cfg = make_cfg([{"name": "h", "type": "hf", "hf_name": "some/dataset"}])
    with pytest.raises(SpudError, match="needs the `datasets` package.*network access.*jsonl or parquet"):
        open_sources(cfg)


def test_hf_streams_rows_and_wraps_network_errors(monkeypatch):
    calls = []

    def load_dataset(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        if name == "offline/ds":
            raise ConnectionError("no route to host")
        return iter([{"text": "row one"}, {"text": None}, {"other": 1}, {"text": "row two"}])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    docs, stats = read_source({"name": "h", "type": "hf", "hf_name": "org/ds", "hf_config": "en"})
    assert docs == ["row one", "row two"] and stats.skipped == {"null": 1, "missing_field": 1}
    assert calls == [("org/ds", "en", "train", True)]
    with pytest.raises(SpudError, match="no route to host.*jsonl or parquet"):
        read_source({"name": "h", "type": "hf", "hf_name": "offline/ds"})
