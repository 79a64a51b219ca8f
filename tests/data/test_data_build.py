"""build_dataset end to end: shards, manifest, reuse, atomic replacement, failure modes."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
from data_helpers import make_cfg, quiet, write_jsonl

from spud.data.build import build_dataset, load_manifest, validate_sources, verify_shards
from spud.data.shards import ShardSet, token_dtype
from spud.errors import SpudError

ARITH = {"name": "arith", "type": "builtin", "builtin": "arithmetic"}
REASON = {"name": "reason", "type": "builtin", "builtin": "reasoning"}


def _build(cfg, run_dir, log=quiet):
    return build_dataset(cfg, run_dir, progress=False, log=log)


# -------------------------------------------------------------------------------------- shards
def test_dtype_follows_vocab_size():
    assert token_dtype(512) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_uint32_shards_keep_large_ids(tmp_path):
    shards = ShardSet(tmp_path, shard_tokens=5, vocab_size=100_000)
    tokens = np.array([0, 65535, 65536, 99_999, 7, 8, 9], dtype=np.uint32)
    shards("train", tokens)
    written = shards.close()
    assert [s["tokens"] for s in written] == [5, 2]
    back = np.concatenate([np.fromfile(tmp_path / s["file"], dtype="<u4") for s in written])
    assert back.tolist() == tokens.tolist()


def test_shards_are_uint16_little_endian_and_bounded(run_dir, tokenizer):
    cfg = make_cfg([ARITH, REASON], total_tokens=12_000, shard_tokens=2_500, val_fraction=0.2)
    manifest = _build(cfg, run_dir)
    assert manifest["dtype"] == "uint16" and manifest["vocab_size"] == tokenizer.vocab_size
    assert manifest["bos_id"] == tokenizer.bos_id
    for split in ("train", "val"):
        shards = [s for s in manifest["shards"] if s["split"] == split]
        assert [s["file"] for s in shards] == [f"{split}_{i:06d}.bin" for i in range(len(shards))]
        assert all(s["tokens"] == 2_500 for s in shards[:-1]) and 0 < shards[-1]["tokens"] <= 2_500
        assert sum(s["tokens"] for s in shards) == manifest[f"{split}_tokens"]
    first = np.fromfile(run_dir / "data" / "train_000000.bin", dtype="<u2")
    assert first[0] == tokenizer.bos_id and first.max() < tokenizer.vocab_size


def test_manifest_hashes_match_and_verify_detects_damage(run_dir):
    manifest = _build(make_cfg([ARITH], total_tokens=6_000, shard_tokens=2_000), run_dir)
    for shard in manifest["shards"]:
        data = (run_dir / "data" / shard["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == shard["sha256"]
        assert len(data) == 2 * shard["tokens"]
    assert verify_shards(run_dir) == len(manifest["shards"])
    victim = run_dir / "data" / "train_000001.bin"
    data = bytearray(victim.read_bytes())
    data[10] ^= 1
    victim.write_bytes(bytes(data))
    (run_dir / "data" / "train_000000.bin").write_bytes(b"")
    with pytest.raises(SpudError) as err:
        verify_shards(run_dir)
    assert "train_000001.bin: sha256 differs" in str(err.value)
    assert "train_000000.bin: 0 bytes" in str(err.value)


def test_manifest_describes_sources(tmp_path, run_dir):
    texts = tmp_path / "texts"
    texts.mkdir()
    for i in range(205):
        (texts / f"{i:03d}.txt").write_text(f"file {i}")
    (texts / "blank.txt").write_text("")
    cfg = make_cfg([{"name": "t", "type": "text", "path": str(texts)}], total_tokens=3_000)
    manifest = _build(cfg, run_dir)
    (src,) = manifest["sources"]
    for key in ("name", "type", "files", "files_count", "documents", "bytes", "train_tokens",
                "val_tokens", "target_tokens", "epochs", "exhausted", "skipped",
                "skipped_examples", "utf8_replacements"):
        assert key in src
    assert len(src["files"]) == 200 and src["files_count"] == 206
    assert src["skipped"] == {"empty": 1} and src["documents"] == 205
    # The data config minus how the build ran (workers): that is recorded apart, with its cost.
    assert manifest["data_config"] == {k: v for k, v in cfg.data.model_dump(mode="json").items() if k != "workers"}
    assert manifest["workers"] == 1 and manifest["workers_peak_rss_mb"] is None
    # Peak RSS of the build's process, in MB: positive and far below 4 GiB for a tiny build.
    assert 10 < manifest["peak_rss_mb"] < 4096
    assert json.loads((run_dir / "data" / "manifest.json").read_text()) == manifest


# ------------------------------------------------------------------------------- reuse / rebuild
def test_rebuild_is_reused_only_when_nothing_changed(tmp_path, run_dir):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": f"line {i} of text"} for i in range(200)])
    source = {"name": "c", "type": "jsonl", "path": str(corpus)}
    cfg = make_cfg([source, ARITH], total_tokens=5_000)
    first = _build(cfg, run_dir)
    shard = run_dir / "data" / "train_000000.bin"
    inode = shard.stat().st_ino

    logs = []
    assert _build(cfg, run_dir, log=logs.append) == first
    assert any("reusing" in line for line in logs) and shard.stat().st_ino == inode
    # Thread count does not change a byte of output: still reused.
    assert _build(make_cfg([source, ARITH], total_tokens=5_000, workers=1), run_dir) == first

    logs.clear()
    second = _build(make_cfg([source, ARITH], total_tokens=6_000), run_dir, log=logs.append)
    assert any("rebuilding" in line for line in logs)
    assert second["train_tokens"] > first["train_tokens"]
    assert load_manifest(run_dir) == second

    # Same config, changed input file: stale shards are rebuilt.
    write_jsonl(corpus, [{"text": f"other line {i}"} for i in range(300)])
    os.utime(corpus, ns=(1, 1))
    logs.clear()
    _build(make_cfg([source, ARITH], total_tokens=6_000), run_dir, log=logs.append)
    assert any("rebuilding" in line for line in logs)
    assert not list(run_dir.glob(".data*"))  # no staging leftovers


def test_tokenizer_is_trained_when_missing(tmp_path):
    run = tmp_path / "fresh"
    cfg = make_cfg([ARITH, REASON], total_tokens=3_000)
    cfg.tokenizer.vocab_size, cfg.tokenizer.train_bytes = 300, 50_000
    manifest = _build(cfg, run)
    assert (run / "tokenizer.json").is_file() and manifest["vocab_size"] <= 300


# ------------------------------------------------------------------------------------- failures
def test_missing_path_fails_before_anything_is_written(tmp_path):
    run = tmp_path / "run"
    cfg = make_cfg([ARITH, {"name": "gone", "type": "text", "path": str(tmp_path / "missing")}])
    with pytest.raises(SpudError, match="'gone'.*does not exist"):
        _build(cfg, run)
    assert not run.exists()  # no tokenizer trained, no data
    with pytest.raises(SpudError, match="does not exist"):
        validate_sources(cfg)


def test_too_many_bad_records_fails_after_counting_and_keeps_old_data(tmp_path, run_dir):
    good = _build(make_cfg([ARITH], total_tokens=2_000), run_dir)
    lines = [{"text": f"good record {i}"} for i in range(20)]
    lines[1], lines[5], lines[9] = "{broken", {"no_text": 1}, "[1]"
    path = write_jsonl(tmp_path / "d.jsonl", lines)
    cfg = make_cfg([{"name": "j", "type": "jsonl", "path": str(path)}], max_bad_fraction=0.1)
    with pytest.raises(SpudError) as err:
        _build(cfg, run_dir)
    msg = str(err.value)
    assert "3 of 20 records are bad" in msg and "data.max_bad_fraction=0.1" in msg
    assert f"{path}:2: not valid JSON" in msg and f"{path}:6: no field 'text'" in msg
    assert load_manifest(run_dir) == good and verify_shards(run_dir) == len(good["shards"])
    assert (run_dir / "tokenizer.json").is_file()
    assert not list(run_dir.glob(".data*"))
    # Under the threshold the same file builds, with the bad lines counted.
    ok = _build(make_cfg([{"name": "j", "type": "jsonl", "path": str(path)}],
                         max_bad_fraction=0.2), run_dir)
    assert ok["sources"][0]["bad_records"] == 3


def test_load_manifest_errors(run_dir):
    with pytest.raises(SpudError, match="manifest.json is missing.*spud data build"):
        load_manifest(run_dir)
    (run_dir / "data").mkdir()
    (run_dir / "data" / "manifest.json").write_text("{not json")
    with pytest.raises(SpudError, match="corrupt"):
        load_manifest(run_dir)
    (run_dir / "data" / "manifest.json").write_text('{"format_version": 1}')
    with pytest.raises(SpudError, match="lacks dtype"):
        load_manifest(run_dir)


def test_corrupt_manifest_is_rebuilt(run_dir):
    cfg = make_cfg([ARITH], total_tokens=2_000)
    _build(cfg, run_dir)
    (run_dir / "data" / "manifest.json").write_text("garbage")
    assert _build(cfg, run_dir)["train_tokens"] > 0
    assert verify_shards(run_dir) >= 1
