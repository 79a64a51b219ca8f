"""Inputs that used to be trained on silently or blow up late: one huge document, a binary file
named .txt, a source with no text, files that vanish or are broken links."""

from __future__ import annotations

import io
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from data_helpers import make_cfg, quiet, read_source, write_jsonl

from spud.data.build import build_dataset
from spud.data.records import MAX_DOCUMENT_BYTES, file_pieces, text_pieces
from spud.data.sources import open_sources
from spud.errors import SpudError

WORDS = "the cat sat on a mat and then it ran off to see what the dog was doing there".split()


def _one_line_file(path: Path, nbytes: int) -> Path:
    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as f:
        written = 0
        while written < nbytes:
            chunk = " ".join(rng.choice(WORDS) for _ in range(2000)) + " "
            f.write(chunk)
            written += len(chunk)
    return path


def _nontext_chars(text: str) -> int:
    """Independent count of what the filter calls non-text (no regex)."""
    keep = {0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x1B}
    return sum(1 for ch in text if ch == "\ufffd" or ord(ch) == 0x7F or (ord(ch) < 0x20 and ord(ch) not in keep))


# -------------------------------------------------------------------------- one huge document
def test_one_huge_document_is_cut_to_the_budget_with_val_and_a_warning(tmp_path, tokenizer_file):
    big = _one_line_file(tmp_path / "book.txt", 8 << 20)  # 8 MiB, no line break at all
    config = tmp_path / "mix.yaml"
    config.write_text(json.dumps({
        "seed": 0,
        "data": {"sources": [{"name": "book", "type": "text", "path": str(big)}],
                 "total_tokens": 6000, "val_fraction": 0.1},
        "tokenizer": {"vocab_size": 512},
    }))
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(tokenizer_file, out / "tokenizer.json")
    code = ("import resource, sys; from spud.cli import main; rc = main(sys.argv[1:]); "
            "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code, "data", "build", str(config), "--out", str(out), "--no-progress"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    log = " ".join(r.stdout.split())
    manifest = json.loads((out / "data" / "manifest.json").read_text())
    (src,) = manifest["sources"]
    # exactly the budget: the first 90% of the cut document is train, the last 10% val
    assert (src["train_tokens"], src["val_tokens"]) == (5400, 600)
    assert (manifest["train_tokens"], manifest["val_tokens"]) == (5400, 600)
    assert src["documents"] == 1 and src["cut_document"] == str(big)
    # only the first piece of the file was read, not 8 MiB
    assert 0 < src["bytes"] <= MAX_DOCUMENT_BYTES and src["epochs"] < 0.15
    warning = (f"source 'book': one document ({big}) supplies 100% of its 6,000 distinct tokens")
    assert warning in " ".join(src["warnings"]) and manifest["warnings"] == src["warnings"]
    assert f"warning: {warning}" in log
    # Bounded memory: the old build tokenized the whole file (~2 GB RSS for 10 MB); now one 1 MiB
    # piece. The bound leaves room for the interpreter, torch and the tokenizer themselves.
    maxrss_mb = int(r.stdout.split("MAXRSS_KB")[1].split()[0]) / 1024
    assert maxrss_mb < 900, maxrss_mb


def test_val_split_of_a_cut_first_document_is_whole_tokens(tmp_path, run_dir, tokenizer):
    big = _one_line_file(tmp_path / "b.txt", 300_000)
    cfg = make_cfg([{"name": "b", "type": "text", "path": str(big)}], total_tokens=2000, val_fraction=0.02)
    manifest = build_dataset(cfg, run_dir, progress=False, log=quiet)
    train = (run_dir / "data" / manifest["shards"][0]["file"]).read_bytes()
    val = (run_dir / "data" / manifest["shards"][1]["file"]).read_bytes()
    import numpy as np

    t, v = np.frombuffer(train, "<u2"), np.frombuffer(val, "<u2")
    assert (len(t), len(v)) == (1960, 40)
    assert t[0] == v[0] == tokenizer.bos_id and tokenizer.bos_id not in t[1:] and tokenizer.bos_id not in v[1:]
    # train then val are consecutive text of the file: together the tokenization of its start
    full = tokenizer.encode(big.read_text()[:20_000])
    assert t[1:].tolist() + v[1:].tolist() == full[:1959 + 39]


def test_small_documents_keep_the_hash_split_and_a_no_val_source_says_why(tmp_path, run_dir):
    d = tmp_path / "few"
    d.mkdir()
    for i in range(3):
        (d / f"{i}.txt").write_text(f"a short note number {i} about cats. " * 20)
    cfg = make_cfg([{"name": "few", "type": "text", "path": str(d)}], total_tokens=100_000, val_fraction=0.01)
    lines = []
    manifest = build_dataset(cfg, run_dir, progress=False, log=lines.append)
    (src,) = manifest["sources"]
    assert src["val_tokens"] == 0 and src["train_tokens"] == 100_000 and src["documents"] == 3
    why = ("source 'few' has no validation tokens: none of its 3 documents fell into the val split "
           "(val_fraction=0.01;")
    assert why in src["warnings"][0] and any(line.startswith(f"warning: {why}") for line in lines)


@pytest.mark.parametrize("max_bytes", [7, 64, 1000])
def test_file_pieces_rejoin_exactly_and_never_split_a_character(max_bytes):
    text = ("héllo wörld 😀 " * 50 + "x" * 300 + "ünïcode" * 40 + "\nline two\n" * 10)
    raw = text.encode()
    pieces = list(file_pieces(io.BytesIO(raw), max_bytes))
    assert b"".join(pieces) == raw
    assert all(0 < len(p) <= max_bytes for p in pieces)
    assert "".join(p.decode("utf-8") for p in pieces) == text  # each piece is valid UTF-8


def test_text_pieces_cut_at_line_breaks():
    text = "".join(f"line {i}\n" for i in range(100))
    pieces = list(text_pieces(text, 50))
    assert "".join(pieces) == text and all(len(p) <= 50 and p.endswith("\n") for p in pieces)


def test_long_jsonl_record_is_read_in_pieces(tmp_path, monkeypatch):
    monkeypatch.setattr("spud.data.sources.MAX_DOCUMENT_BYTES", 100)
    text = "".join(f"sentence {i}.\n" for i in range(40))
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": text}, {"text": "short"}])
    docs, stats = read_source({"name": "j", "type": "jsonl", "path": str(path)})
    assert "".join(docs[:-1]) == text and docs[-1] == "short"
    assert all(len(d) <= 100 for d in docs) and len(docs) > 5
    assert stats.records == 2 and stats.split_documents == 1


# ------------------------------------------------------------------------------ binary files
def test_binary_file_named_txt_is_skipped_with_its_path(tmp_path):
    binary = Path("/bin/ls").read_bytes() if Path("/bin/ls").is_file() else random.Random(1).randbytes(150_000)
    (tmp_path / "ls.txt").write_bytes(binary)
    (tmp_path / "noise.txt").write_bytes(random.Random(2).randbytes(20_000))
    (tmp_path / "ok.txt").write_text("Plain prose, with a tab\tand a form feed\f, is text.\n" * 10)
    docs, stats = read_source({"name": "t", "type": "text", "path": str(tmp_path)})
    assert docs == [(tmp_path / "ok.txt").read_text()]
    assert stats.skipped == {"not_text": 2} and stats.records == 3 and stats.bad_records == 0
    for name, raw in (("ls.txt", binary), ("noise.txt", (tmp_path / "noise.txt").read_bytes())):
        decoded = raw.decode("utf-8", errors="replace")
        bad = _nontext_chars(decoded)
        expected = (f"{tmp_path / name}: not text: {bad:,} of {len(decoded):,} characters "
                    f"({bad / len(decoded):.0%}) are invalid UTF-8 or control characters, more than 10% "
                    "(a binary file, or another encoding?)")
        assert expected in stats.skipped_examples


def test_binary_file_is_counted_in_the_manifest(tmp_path, run_dir):
    (tmp_path / "a.txt").write_bytes(random.Random(3).randbytes(5000))
    (tmp_path / "b.txt").write_text("the cat sat on the mat. " * 400)
    cfg = make_cfg([{"name": "t", "type": "text", "path": str(tmp_path)}], total_tokens=3000)
    (src,) = build_dataset(cfg, run_dir, progress=False, log=quiet)["sources"]
    assert src["skipped"] == {"not_text": 1} and src["documents"] == 1
    assert src["skipped_examples"][0].startswith(f"{tmp_path / 'a.txt'}: not text: ")


def test_mostly_text_with_a_few_bad_bytes_is_kept(tmp_path):
    raw = ("Ordinary text. " * 20).encode() + b"\xff\xfe\x00" + ("More text. " * 5).encode()
    (tmp_path / "a.txt").write_bytes(raw)
    docs, stats = read_source({"name": "t", "type": "text", "path": str(tmp_path)})
    assert len(docs) == 1 and stats.skipped == {} and stats.utf8_replacements == 2


# ------------------------------------------------------------------ sources without any text
def test_source_of_only_empty_files_fails_before_the_tokenizer_naming_them(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("  \n\n\t")
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.txt").write_text("real text here")
    cfg = make_cfg([{"name": "ok", "type": "text", "path": str(other)},
                    {"name": "e", "type": "text", "path": str(tmp_path / "empty.txt")},
                    {"name": "d", "type": "text", "path": str(tmp_path), "split": "blank_lines"}])
    run = tmp_path / "run"
    with pytest.raises(SpudError) as e:
        build_dataset(cfg, run, progress=False, log=quiet)
    assert str(e.value) == (
        "invalid data sources:\n"
        f"  data.sources[1] ('e', type text): no text: the file is empty or whitespace-only "
        f"({tmp_path / 'empty.txt'}); fill it, or remove the source from data.sources"
    )
    assert not run.exists()  # no tokenizer was trained, nothing was written


def test_jsonl_blank_lines_and_wrong_field_kinds_are_counted(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "one"}, "", "   ", {"text": {"a": 1}},
                                              {"text": [1]}, {"text": "two"}, ""])
    docs, stats = read_source({"name": "j", "type": "jsonl", "path": str(path)})
    assert docs == ["one", "two"] and stats.blank_lines == 3 and stats.records == 4
    assert stats.skipped_examples == [f"{path}:4: field 'text' is an object, not a string",
                                      f"{path}:5: field 'text' is an array, not a string"]
    assert stats.to_dict()["blank_lines"] == 3


# ------------------------------------------------- files that cannot be read (also as root)
def test_broken_symlink_in_a_source_directory_is_named(tmp_path):
    (tmp_path / "a.txt").write_text("fine")
    (tmp_path / "b.txt").symlink_to(tmp_path / "gone.txt")
    with pytest.raises(SpudError) as e:
        open_sources(make_cfg([{"name": "t", "type": "text", "path": str(tmp_path)}]))
    assert str(e.value) == (f"invalid data sources:\n  data.sources[0] ('t', type text): {tmp_path / 'b.txt'} "
                            f"is a broken symbolic link (to {tmp_path / 'gone.txt'}); fix or remove it")


def test_directory_named_like_a_file_is_descended_not_read(tmp_path):
    (tmp_path / "notes.txt").mkdir()
    (tmp_path / "notes.txt" / "inner.txt").write_text("inside")
    docs, stats = read_source({"name": "t", "type": "text", "path": str(tmp_path)})
    assert docs == ["inside"] and stats.files == [str(tmp_path / "notes.txt" / "inner.txt")]


def test_file_removed_between_listing_and_reading(tmp_path):
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "b.txt").write_text("second")
    (source,) = open_sources(make_cfg([{"name": "t", "type": "text", "path": str(tmp_path)}]))
    (tmp_path / "b.txt").unlink()
    docs = source.documents()
    assert next(docs).text == "first"
    with pytest.raises(SpudError) as e:
        next(docs)
    assert str(e.value) == f"source 't': cannot read {tmp_path / 'b.txt'} (No such file or directory)"
