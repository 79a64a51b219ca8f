"""Cleaning and dedup inside a real build: a generated corpus with planted junk and planted
duplicates (exact counts), repeats that replay first-pass decisions, the manifest, inspect."""

import re

import numpy as np
import pytest
import yaml
from data_helpers import make_cfg, quiet, write_jsonl, page

from spud.cli import main
from spud.config import load_config
from spud.data.build import build_dataset
from spud.errors import SpudError
from spud.tokenizer import Tokenizer

def corpus(tmp_path):
    good = [page(i) for i in range(40)]
    junk = ["short page", "#tag " * 60, "\n".join(["same line repeated here and there"] * 12)]
    exact = [good[3].upper(), good[7]]                      # 2 exact duplicates
    near = [good[10].replace("miller", "baker", 1) + " end", good[11] + " again"]  # 2 near duplicates
    web = write_jsonl(tmp_path / "web.jsonl", [{"text": t} for t in good + junk + exact + near])
    other = write_jsonl(tmp_path / "other.jsonl", [{"text": good[0]}, {"text": page(999)}])  # 1 cross-source dup
    return web, other


def cfg_for(web, other, **extra):
    return make_cfg([
        {"name": "web", "type": "jsonl", "path": str(web), "clean": {"kind": "text"}},
        {"name": "other", "type": "jsonl", "path": str(other), "weight": 0.2},
    ], dedup={"exact": True, "near": True, "threshold": 0.7, "ngram": 3}, val_fraction=0.0, **extra)


def test_build_removes_planted_junk_and_duplicates_with_exact_counts(tmp_path, run_dir, monkeypatch):
    # re-read the source on every repeat (as for sources too large to replay from memory), so the
    # cleaner's first-pass decisions must be replayed, not re-judged
    monkeypatch.setattr("spud.data.mix.REPEAT_CACHE_TOKENS", 0)
    web, other = corpus(tmp_path)
    manifest = build_dataset(cfg_for(web, other, total_tokens=60_000), run_dir, progress=False, log=quiet)
    src = {s["name"]: s for s in manifest["sources"]}
    w = src["web"]
    assert w["skipped"] == {"duplicate:exact": 2, "duplicate:near": 2, "quality:duplicate_lines": 1,
                            "quality:n_words": 1, "quality:symbol_ratio": 1}
    assert w["cleaning"]["quality"]["n_words"] == {"documents": 1, "bytes": len("short page")}
    assert w["cleaning"]["dedup"]["exact"]["documents"] == 2
    assert w["cleaning"]["dedup"]["near"]["documents"] == 2
    assert w["documents"] == 40
    assert w["epochs"] > 1  # repeated: the replayed passes dropped the same documents, not all of them
    assert src["other"]["skipped"] == {"duplicate:exact": 1} and src["other"]["documents"] == 1
    assert sum(s["train_tokens"] for s in manifest["sources"]) == manifest["train_tokens"] == 60_000
    # what reached the shards: no junk, on the first pass or on the repeats
    tok = Tokenizer.load(run_dir / "tokenizer.json")
    ids = np.concatenate([np.fromfile(run_dir / "data" / sh["file"], dtype=manifest["dtype"])
                          for sh in manifest["shards"] if sh["split"] == "train"])
    text = tok.decode(ids.tolist())
    assert "short page" not in text and "#tag #tag" not in text and "same line repeated" not in text
    assert text.count(page(5)[:60]) >= 2  # a kept page is there on every pass


def test_inspect_shows_what_each_rule_dropped(tmp_path, run_dir, capsys):
    web, other = corpus(tmp_path)
    build_dataset(cfg_for(web, other), run_dir, progress=False, log=quiet)
    assert main(["data", "inspect", str(run_dir), "--rule", "n_words"]) == 0
    out = capsys.readouterr().out
    assert "dropped by quality:n_words (1 documents)" in out and "short page" in out
    assert "n_words=2 < 50" in out and "duplicate" not in out
    assert main(["data", "inspect", str(run_dir), "--n", "1"]) == 0
    out = capsys.readouterr().out
    assert "duplicate:near" in out and "kept" in out
    assert main(["data", "inspect", str(run_dir), "--rule", "n_word"]) == 2
    assert "did you mean" in capsys.readouterr().err


@pytest.mark.parametrize("clean, dedup, message", [
    ({"kind": "text", "rules": {"mean_word_lenght": False}}, {}, "did you mean 'mean_word_length'"),
    ({"kind": "text", "rules": {"n_words": {"min": 9, "max": 3}}}, {}, "min 9 > max 3"),
    ({}, {"near": True, "threshold": 1.5}, "threshold"),
])
def test_bad_cleaning_config_fails_before_any_work(tmp_path, clean, dedup, message):
    web, _ = corpus(tmp_path)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"data": {"sources": [{"name": "web", "type": "jsonl", "path": str(web),
                                                          "clean": clean}], "dedup": dedup}}))
    out = tmp_path / "run"
    with pytest.raises(SpudError, match=re.escape(message)):
        build_dataset(load_config(path), out, progress=False, log=quiet)
    assert not (out / "tokenizer.json").exists()  # nothing trained before the error
