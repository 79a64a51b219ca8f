"""Held-out corpora: the stdlib slice is disjoint from every built-in training source (by
construction and by check), and directories of text/markdown/HTML read as a user expects."""

from __future__ import annotations

import gzip

import pytest
from data_helpers import make_cfg, quiet

from spud.data import builtin, heldout
from spud.data.build import build_dataset
from spud.data.shards import load_manifest
from spud.errors import SpudError
from spud.eval.decontam import shard_documents


def _rel(paths) -> list[str]:
    return [p.relative_to(builtin.stdlib_root()).as_posix() for p in paths]


def _raw_heldout_docs() -> list[str]:
    """Every docstring document of the held-out modules, before the 13-gram filter."""
    docs = []
    for path in builtin.stdlib_files(heldout=True):
        docs += builtin.docstring_documents(path.read_text(errors="replace"), builtin.module_name(path)) or []
    return docs


def test_heldout_modules_partition_the_stdlib():
    train, held = _rel(builtin.stdlib_files()), _rel(builtin.stdlib_files(heldout=True))
    assert held and not set(train) & set(held)
    assert 0.03 < len(held) / (len(train) + len(held)) < 0.15  # HELDOUT_FRACTION = 8 % of modules
    assert all(builtin.is_heldout_module(r) for r in held)


def test_builtin_training_sources_exclude_heldout_modules():
    from spud.data.sources import open_sources

    cfg = make_cfg([{"name": "d", "type": "builtin", "builtin": "stdlib_docs"},
                    {"name": "c", "type": "builtin", "builtin": "stdlib_code"}])
    held = set(_rel(builtin.stdlib_files(heldout=True)))
    for source in open_sources(cfg):
        assert len(source.files) > 300 and not set(_rel(source.files)) & held


def test_built_dataset_holds_no_heldout_document(run_dir):
    # Large enough to read past the first held-out module in sorted order (_py_abc.py).
    cfg = make_cfg([{"name": "docs", "type": "builtin", "builtin": "stdlib_docs"}],
                   total_tokens=60_000, val_fraction=0.05)
    build_dataset(cfg, run_dir, progress=False, log=quiet)
    (source,) = load_manifest(run_dir)["sources"]
    read = source["files"]
    held = _rel(builtin.stdlib_files(heldout=True))
    assert any(h < read[-1] for h in held), "the build must cover the range of a held-out module"
    assert not set(read) & set(held)
    built = [d for _, docs, _ in shard_documents(run_dir, None) for d in docs]
    assert len(built) > 30
    held_hashes = {heldout.document_hash(d) for d in _raw_heldout_docs()}
    assert not {heldout.document_hash(d) for d in built} & held_hashes
    prose = heldout.stdlib_prose()
    assert prose.nbytes > 50_000 and len(prose.documents) > 100
    assert heldout.ngram_overlap(prose.documents, built)["found"] == 0


# ---------------------------------------------------------------------------------- directories
PAGE = """<!DOCTYPE html><html><head><title>Manual</title><style>p {color: red}</style></head>
<body><div class="header"><p>Next: <a href="#b">Other</a>, Up: Top</p></div>
<h2>Chapter One</h2>
<p>Programs should   report errors
clearly &amp; name the file.</p>
<script>var tracking = 1;</script>
<pre>make install
  DESTDIR=/tmp</pre>
<table class="index-cp"><tr><td>index entry</td></tr></table>
</body></html>"""


def _docs_dir(tmp_path):
    d = tmp_path / "doc"
    (d / "sub").mkdir(parents=True)
    (d / "manual.html").write_text(PAGE, encoding="utf-8")
    (d / "sub" / "notes.md").write_text("# Notes\n\nFirst paragraph.\n\nSecond paragraph.\n", encoding="utf-8")
    (d / "readme.txt").write_text("Plain text file.\n", encoding="utf-8")
    (d / "changelog.gz").write_bytes(gzip.compress(b"skipped: not a text suffix"))
    (d / "logo.png").write_bytes(b"\x89PNG")
    return d


def test_read_directory_strips_html_and_keeps_prose(tmp_path):
    corpus = heldout.read_directory(_docs_dir(tmp_path), "manuals")
    text = "\n\n".join(corpus.documents)
    assert corpus.name == "manuals" and "3 files" in corpus.origin
    assert "Programs should report errors clearly & name the file." in text
    assert "make install\n  DESTDIR=/tmp" in text  # <pre> keeps its layout
    assert "Chapter One" in text and "Plain text file." in text and "Second paragraph." in text
    for noise in ("color: red", "tracking", "Next:", "index entry", "skipped", "<p>", "Manual"):
        assert noise not in text


def test_split_documents_groups_whole_paragraphs():
    paras = [f"Paragraph {i} " + "word " * 50 for i in range(40)]
    docs = heldout.split_documents("\n\n".join(paras), max_chars=1000)
    assert len(docs) > 5 and all(len(d) <= 1000 for d in docs)
    assert "\n\n".join(docs) == "\n\n".join(p.strip() for p in paras)


def test_resolve_specs_and_errors(tmp_path):
    d = _docs_dir(tmp_path)
    assert heldout.resolve(f"gnu={d}").name == "gnu"
    assert heldout.resolve(str(d)).name == "doc"
    assert heldout.resolve("stdlib_prose").name == "stdlib_prose"
    with pytest.raises(SpudError, match="does not exist.*gnu-standards"):
        heldout.resolve(f"gnu={tmp_path / 'missing'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpudError, match="no .txt/.md"):
        heldout.resolve(str(tmp_path / "empty"))
    with pytest.raises(SpudError, match="two corpora are named doc"):
        heldout.resolve_all([str(d), f"doc={d}"])
    with pytest.raises(SpudError, match="name before '='"):
        heldout.resolve(f"a b={d}")


def test_evenly_spaced_is_bounded_and_spread():
    docs = [f"document {i:03d} " + "x" * 90 for i in range(100)]  # 103 bytes each
    picked = heldout.evenly_spaced(docs, 1030)
    assert len(picked) == 10 and picked[0] == docs[0] and picked[-1] == docs[90]
    assert heldout.evenly_spaced(docs, 10**6) == docs


def test_ngram_overlap_counts_shared_13grams():
    held = " ".join(f"w{i}" for i in range(30))  # 18 distinct 13-grams
    other = " ".join(f"a{i}" for i in range(15))  # 3
    copied = "\n".join(f"W{i}" for i in range(20))  # w0..w19, case and line breaks changed
    r = heldout.ngram_overlap([held, other], [f"prefix {copied} suffix", "unrelated text"])
    assert r["per_document"] == [20 - 13 + 1, 0]
    assert r["found"] == 8 and r["ngrams"] == 18 + 3 and r["fraction"] == pytest.approx(8 / 21)
