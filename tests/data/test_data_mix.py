"""Mix accounting: targets, repetition, cutting, the train/val split, BOS separators, sampling."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from data_helpers import make_cfg, quiet, write_jsonl

from spud.data.build import build_dataset
from spud.data.builtin import generated_documents
from spud.data.mix import is_val_document, sample_texts_for_tokenizer, token_targets
from spud.data.sources import source_seed
from spud.errors import SpudError

SMALL_DOCS = [f"Small document number {i} says hello to the world." for i in range(8)]


def _split_docs(tokens: np.ndarray, bos: int) -> list[np.ndarray]:
    starts = np.flatnonzero(tokens == bos)
    assert starts[0] == 0
    return np.split(tokens, starts[1:])


def _source_tokens(run_dir, manifest: dict, split: str) -> dict[str, np.ndarray]:
    """Sources are written one after another, so each one's tokens are a contiguous range."""
    files = [s["file"] for s in manifest["shards"] if s["split"] == split]
    tokens = np.concatenate([np.fromfile(run_dir / "data" / f, dtype=manifest["dtype"]) for f in files])
    out, start = {}, 0
    for s in manifest["sources"]:
        n = s[f"{split}_tokens"]
        out[s["name"]] = tokens[start:start + n]
        start += n
    assert start == len(tokens)
    return out


@pytest.fixture
def mixed(tmp_path, run_dir):
    small = tmp_path / "small"
    small.mkdir()
    for i, text in enumerate(SMALL_DOCS):
        (small / f"{i}.txt").write_text(text)
    big = write_jsonl(tmp_path / "big.jsonl",
                      [{"text": f"Record {i}: the {i % 7} cats sat on {i % 13} mats."} for i in range(3000)])
    cfg = make_cfg([
        {"name": "small", "type": "text", "path": str(small), "weight": 1},
        {"name": "big", "type": "jsonl", "path": str(big), "weight": 1},
        {"name": "arith", "type": "builtin", "builtin": "arithmetic", "weight": 2},
    ], total_tokens=24_000, val_fraction=0.1)
    return cfg, build_dataset(cfg, run_dir, progress=False, log=quiet)


def test_targets_are_weight_shares():
    cfg = make_cfg([{"name": n, "type": "builtin", "builtin": "arithmetic", "weight": w}
                    for n, w in (("a", 1), ("b", 3))], total_tokens=1000)
    assert token_targets(cfg.data) == [250, 750]


def test_each_source_gets_its_share(mixed):
    _, manifest = mixed
    by_name = {s["name"]: s for s in manifest["sources"]}
    assert [s["target_tokens"] for s in manifest["sources"]] == [6000, 6000, 12000]
    for s in manifest["sources"]:  # exactly: the document crossing the target is cut there
        assert s["train_tokens"] + s["val_tokens"] == s["target_tokens"], s["name"]
    total = manifest["train_tokens"] + manifest["val_tokens"]
    assert total == sum(s["train_tokens"] + s["val_tokens"] for s in by_name.values())


def test_small_source_repeats_in_order(mixed, run_dir, tokenizer):
    cfg, manifest = mixed
    small = manifest["sources"][0]
    assert small["exhausted"] and small["epochs"] > 3
    assert small["documents"] == len(SMALL_DOCS) and small["files_count"] == 8
    train_docs = [d for d in SMALL_DOCS if not is_val_document(d, cfg.data.val_fraction)]
    val_docs = [d for d in SMALL_DOCS if is_val_document(d, cfg.data.val_fraction)]
    # Train: whole documents, the full pass repeated, then a prefix of it (the partial epoch).
    got = [tokenizer.decode(d[1:].tolist()) for d in
           _split_docs(_source_tokens(run_dir, manifest, "train")["small"], tokenizer.bos_id)]
    expected = (train_docs * 100)[:len(got)]
    assert got[:-1] == expected[:-1]
    # the last one is cut where the source reaches its target: a prefix (or all) of its document
    assert got[-1] and expected[-1].startswith(got[-1])
    assert small["train_tokens"] + small["val_tokens"] == small["target_tokens"]
    passes = len(got) / len(train_docs)
    assert small["epochs"] == pytest.approx(passes, abs=0.15)
    # Val is never repeated: each val document appears once.
    val = _split_docs(_source_tokens(run_dir, manifest, "val")["small"], tokenizer.bos_id) \
        if small["val_tokens"] else []
    assert [tokenizer.decode(d[1:].tolist()) for d in val] == val_docs


def test_big_source_is_cut(mixed):
    _, manifest = mixed
    big = manifest["sources"][1]
    assert not big["exhausted"] and 0 < big["epochs"] < 1
    assert big["documents"] < 3000


def test_generator_stops_at_target(mixed):
    _, manifest = mixed
    arith = manifest["sources"][2]
    assert arith["infinite"] and not arith["exhausted"] and arith["epochs"] == 0.0


def test_every_document_starts_with_bos(mixed, run_dir, tokenizer):
    _, manifest = mixed
    for split in ("train", "val"):
        for name, tokens in _source_tokens(run_dir, manifest, split).items():
            if len(tokens):
                assert tokens[0] == tokenizer.bos_id, (split, name)
    val_docs = sum(len(_split_docs(t, tokenizer.bos_id))
                   for t in _source_tokens(run_dir, manifest, "val").values() if len(t))
    assert val_docs > 0


def test_val_split_is_a_function_of_the_text(mixed, run_dir, tokenizer):
    cfg, manifest = mixed
    cut = {s["name"]: s["cut_document"] for s in manifest["sources"]}
    for name, t in _source_tokens(run_dir, manifest, "val").items():
        if len(t):
            texts = [tokenizer.decode(doc[1:].tolist()) for doc in _split_docs(t, tokenizer.bos_id)]
            assert all(is_val_document(text, cfg.data.val_fraction) for text in texts[:-1])
            # the last one may be the document cut at the source's target: a prefix of a val text
            assert is_val_document(texts[-1], cfg.data.val_fraction) or cut[name]
    share = manifest["val_tokens"] / (manifest["train_tokens"] + manifest["val_tokens"])
    assert 0.04 < share < 0.2
    assert is_val_document("x", 0.0) is False


def test_build_is_deterministic(tmp_path, mixed, tokenizer_file):
    cfg, manifest = mixed
    again = tmp_path / "again"
    again.mkdir()
    (again / "tokenizer.json").write_bytes(tokenizer_file.read_bytes())
    other = build_dataset(cfg, again, progress=False, log=quiet)
    assert [s["sha256"] for s in other["shards"]] == [s["sha256"] for s in manifest["shards"]]


def test_max_documents_caps_a_repeated_source(tmp_path, run_dir):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": f"doc {i} " * 5} for i in range(50)])
    cfg = make_cfg([{"name": "j", "type": "jsonl", "path": str(path), "max_documents": 10}],
                   total_tokens=2000, val_fraction=0)
    src = build_dataset(cfg, run_dir, progress=False, log=quiet)["sources"][0]
    assert src["documents"] == 10 and src["exhausted"] and src["epochs"] > 1


def test_source_without_usable_documents(tmp_path, run_dir):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": ""}, {"text": "  "}])
    cfg = make_cfg([{"name": "j", "type": "jsonl", "path": str(path)}])
    with pytest.raises(SpudError, match="'j' has no usable documents.*empty: 2"):
        build_dataset(cfg, run_dir, progress=False, log=quiet)


def test_progress_bar_can_be_shown(run_dir):
    cfg = make_cfg([{"name": "a", "type": "builtin", "builtin": "arithmetic"}], total_tokens=3000)
    assert build_dataset(cfg, run_dir, progress=True, log=quiet)["train_tokens"] > 0


# ------------------------------------------------------------------------ tokenizer sampling
def test_sample_texts_follow_weights_and_budget():
    cfg = make_cfg([{"name": "a", "type": "builtin", "builtin": "arithmetic", "weight": 3},
                    {"name": "r", "type": "builtin", "builtin": "reasoning", "weight": 1}])
    texts = list(sample_texts_for_tokenizer(cfg))
    assert texts == list(sample_texts_for_tokenizer(cfg))
    sizes = [len(t.encode()) for t in texts]
    assert sum(sizes) >= 200_000 > sum(sizes[:-1])
    arith_docs = set(itertools.islice(generated_documents("arithmetic", source_seed(0, "a")), 1000))
    arith = sum(len(t.encode()) for t in texts if t in arith_docs)
    assert 0.74 < arith / sum(sizes) < 0.76


def test_sample_texts_drop_exhausted_sources(tmp_path):
    (tmp_path / "a.txt").write_text("only document")
    cfg = make_cfg([{"name": "t", "type": "text", "path": str(tmp_path)},
                    {"name": "r", "type": "builtin", "builtin": "reasoning"}])
    texts = list(sample_texts_for_tokenizer(cfg))
    assert texts.count("only document") == 1 and len(texts) > 10


def test_capped_generator_is_finite_and_repeats(run_dir):
    cfg = make_cfg([{"name": "a", "type": "builtin", "builtin": "arithmetic", "max_documents": 3}],
                   total_tokens=3_000, val_fraction=0)
    src = build_dataset(cfg, run_dir, progress=False, log=quiet)["sources"][0]
    assert not src["infinite"] and src["exhausted"] and src["documents"] == 3
    assert src["epochs"] > 1
