"""Sharded builds: N parts (`spud data build --shard i/N`) merged (`spud data merge`) equal a single
build exactly — manifest and shard bytes — with planted duplicates across parts, planted junk, a
source cut by its budget, a repeated one and a generated one; and the bad inputs are refused."""

import json
import shutil

import pytest
import yaml
from data_helpers import make_cfg, quiet, what_was_built, page

from spud.cli import main
from spud.data.build import build_dataset
from spud.data.merge import build_part, merge_parts, parse_shard
from spud.errors import SpudError

def corpus(tmp_path):
    """web/: 5 jsonl files (→ parts 0,1,2,0,1) with duplicates planted across files; notes/: text
    files split on blank lines; a generated source the merge reads itself."""
    good = [page(i) for i in range(60)]
    junk = ["short page", "#tag " * 60, "\n".join(["same line repeated here and there"] * 12)]
    web = tmp_path / "web"
    web.mkdir()
    files = [good[0:12] + [junk[0]], good[12:24] + [good[3].upper()],             # exact dup of file 0
             good[24:36] + [junk[1], good[14] + " again"],                          # near dup of file 1
             good[36:48] + [good[3], junk[2]], good[48:60] + [good[30].replace("miller", "baker", 1)]]
    for k, docs in enumerate(files):
        (web / f"f{k}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    notes = tmp_path / "notes"
    notes.mkdir()
    for k in range(4):
        (notes / f"n{k}.txt").write_text(f"{page(100 + k, 40)}\n\n{good[5 * k]}\n\n{page(200 + k, 30)}\n")
    return web, notes


def sources(web, notes):
    return [
        {"name": "web", "type": "jsonl", "path": str(web), "clean": {"kind": "text"}},
        {"name": "notes", "type": "text", "path": str(notes), "split": "blank_lines", "weight": 0.5},
        {"name": "math", "type": "builtin", "builtin": "arithmetic", "weight": 0.1},
    ]


def cfg_for(web, notes, total_tokens):
    return make_cfg(sources(web, notes), dedup={"exact": True, "near": True, "threshold": 0.7, "ngram": 3},
                    val_fraction=0.1, total_tokens=total_tokens, shard_tokens=3000)


def sharded(cfg, tmp_path, tokenizer_file, n=3):
    parts = []
    for i in range(n):
        part = tmp_path / f"part{i}"
        part.mkdir()
        shutil.copy(tokenizer_file, part / "tokenizer.json")
        build_part(cfg, part, f"{i}/{n}", log=quiet)
        parts.append(part)
    return parts


def same_dataset(a, b):
    ma = json.loads((a / "data" / "manifest.json").read_text())
    mb = json.loads((b / "data" / "manifest.json").read_text())
    ma, mb = what_was_built(ma), what_was_built(mb)
    assert ma == mb
    for shard in ma["shards"]:
        assert (a / "data" / shard["file"]).read_bytes() == (b / "data" / shard["file"]).read_bytes()
    return ma


# total 9000: web is cut mid-pass (epochs < 1); 30000: web and notes repeat
@pytest.mark.parametrize("total_tokens", [9000, 30000])
def test_three_parts_merged_equal_a_single_build(tmp_path, run_dir, tokenizer_file, total_tokens):
    web, notes = corpus(tmp_path)
    cfg = cfg_for(web, notes, total_tokens)
    single = build_dataset(cfg, run_dir, progress=False, log=quiet)
    merged_run = tmp_path / "merged"
    merge_parts(sharded(cfg, tmp_path, tokenizer_file), merged_run, progress=False, log=quiet)
    manifest = same_dataset(run_dir, merged_run)
    web_report = manifest["sources"][0]
    if total_tokens == 30000:  # the whole of web was read: every planted item is counted
        assert web_report["skipped"] == {"duplicate:exact": 2, "duplicate:near": 2, "quality:duplicate_lines": 1,
                                         "quality:n_words": 1, "quality:symbol_ratio": 1}
        assert web_report["epochs"] > 1 and web_report["files_count"] == 5
        assert manifest["sources"][1]["skipped"] == {"duplicate:exact": 4}  # notes repeat web's pages
    else:
        assert web_report["epochs"] < 1
    assert single["train_tokens"] + single["val_tokens"] == sum(s["target_tokens"] for s in single["sources"])


def test_cli_shard_and_merge(tmp_path, tokenizer_file, capsys):
    web, notes = corpus(tmp_path)
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg_for(web, notes, 9000).model_dump(mode="json")))
    parts = []
    for i in range(2):
        part = tmp_path / f"p{i}"
        part.mkdir()
        shutil.copy(tokenizer_file, part / "tokenizer.json")
        assert main(["data", "build", str(cfg_path), "--out", str(part), "--shard", f"{i}/2", "--no-progress"]) == 0
        parts.append(str(part))
    assert main(["data", "merge", *parts, "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    single = tmp_path / "single"
    single.mkdir()
    shutil.copy(tokenizer_file, single / "tokenizer.json")
    assert main(["data", "build", str(cfg_path), "--out", str(single), "--no-progress"]) == 0
    same_dataset(single, tmp_path / "run")
    # bad shard specs: a clear error before any work, no traceback
    for spec in ("4/3", "3/3", "x", "1/0"):
        assert main(["data", "build", str(cfg_path), "--out", str(tmp_path / "bad"), "--shard", spec]) != 0
        assert "--shard" in capsys.readouterr().err
    assert not (tmp_path / "bad" / "part").exists()


def test_parse_shard():
    assert parse_shard("0/1") == (0, 1) and parse_shard("2/3") == (2, 3)
    for spec in ("4/3", "3/3", "-1/3", "1/0", "1", "a/b"):
        with pytest.raises(SpudError, match="--shard"):
            parse_shard(spec)


def test_merge_refuses_mismatched_parts(tmp_path, tokenizer_file):
    web, notes = corpus(tmp_path)
    cfg = cfg_for(web, notes, 9000)
    p0, p1 = sharded(cfg, tmp_path, tokenizer_file, n=2)
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(tokenizer_file, other / "tokenizer.json")
    changed = make_cfg(sources(web, notes), dedup={"exact": True, "near": True, "threshold": 0.9, "ngram": 3},
                       val_fraction=0.1, total_tokens=9000, shard_tokens=3000)
    build_part(changed, other, "1/2", log=quiet)
    with pytest.raises(SpudError, match=r"different configs \(data\.dedup\.threshold: 0\.7 vs 0\.9\)"):
        merge_parts([p0, other], tmp_path / "run", log=quiet)
    with pytest.raises(SpudError, match="missing part"):
        merge_parts([p0], tmp_path / "run", log=quiet)
    with pytest.raises(SpudError, match="both part 0/2"):
        merge_parts([p0, p0], tmp_path / "run", log=quiet)
    # a part built with another tokenizer (its recorded hash differs)
    data = json.loads((p1 / "part" / "part.json").read_text())
    data["tokenizer_sha256"] = "0" * 64
    (p1 / "part" / "part.json").write_text(json.dumps(data))
    with pytest.raises(SpudError, match="different tokenizers"):
        merge_parts([p0, p1], tmp_path / "run", log=quiet)
    assert not (tmp_path / "run" / "data").exists()


def test_documents_read_in_pieces_merge_exactly(tmp_path, run_dir, tokenizer_file):
    """A file longer than 1 MiB is read in pieces (one judged document, several token runs): its
    copy in another part is dropped as a duplicate with all its pieces, and a long document the
    rules drop goes with all its pieces, exactly as in a single build."""
    def write_books(d, seed, long_at):
        d.mkdir()
        for k in range(4):
            lines = [page(seed + 1000 * k + i, 12) for i in range(20000 if k == long_at else 40)]
            (d / f"b{k}.txt").write_text("\n".join(lines) + "\n")

    books, notes = tmp_path / "books", tmp_path / "notes"
    write_books(books, 0, long_at=1)
    shutil.copy(books / "b1.txt", books / "b4.txt")  # file 4 → another part than file 1 (of 3)
    write_books(notes, 50_000, long_at=2)
    assert (books / "b1.txt").stat().st_size > 1 << 20
    cfg = make_cfg([{"name": "books", "type": "text", "path": str(books)},
                    {"name": "notes", "type": "text", "path": str(notes), "clean": {"kind": "text"},
                     "weight": 0.02}],
                   dedup={"exact": True}, val_fraction=0.1, total_tokens=1_200_000, shard_tokens=400_000)
    build_dataset(cfg, run_dir, progress=False, log=quiet)
    merge_parts(sharded(cfg, tmp_path, tokenizer_file), tmp_path / "merged", progress=False, log=quiet)
    manifest = same_dataset(run_dir, tmp_path / "merged")
    books_report, notes_report = manifest["sources"]
    assert books_report["split_documents"] == 1 and books_report["epochs"] > 1
    assert books_report["skipped"] == {"duplicate:exact": 1}
    assert notes_report["skipped"] == {"quality:n_words": 1}  # the long one, all its pieces
