"""The exported README.md: Hugging Face front matter and figures taken from the run's own files."""

from __future__ import annotations

import json

import pytest
import yaml

from spud.export.hf import export_hf
from spud.export.source import load_source
from spud.model.flops import flops_per_token

pytest.importorskip("transformers")


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_model_card_of_a_trained_run(trained_run, tmp_path):
    run = tmp_path / "run"
    import shutil

    shutil.copytree(trained_run, run)
    src = load_source(run, "base")
    ck = src.checkpoint.name
    # an eval result of the exported checkpoint (in the newer eval/<model>-<checkpoint>/ layout)
    # and an older one of another checkpoint
    mine = run / "eval" / f"base-{ck}"
    mine.mkdir(parents=True)
    (mine / "results.json").write_text(json.dumps({
        "model": "base", "checkpoint": str(src.checkpoint),
        "tasks": {"arith": {"metric": "acc", "value": 0.4321, "stderr": 0.05, "n": 100}}}))
    old = run / "eval" / "step_0000004"
    old.mkdir()
    (old / "results.json").write_text(json.dumps({
        "checkpoint": "step_0000004", "tasks": {"arith": {"metric": "acc", "value": 0.1111, "stderr": 0.03, "n": 100}}}))
    out = tmp_path / "hf"
    export_hf(run, out)
    text = (out / "README.md").read_text()
    fm = front_matter(text)
    assert fm["library_name"] == "transformers" and fm["pipeline_tag"] == "text-generation"
    results = fm["model-index"][0]["results"]
    assert results == [{"task": {"type": "text-generation"}, "dataset": {"name": "arith", "type": "arith"},
                        "metrics": [{"type": "acc", "value": 0.4321}]}]  # only the exported checkpoint's
    assert "0.4321" in text and "0.1111" in text  # both listed in the body, each with its checkpoint
    manifest = json.loads((run / "data" / "manifest.json").read_text())
    for s in manifest["sources"]:
        assert f"| {s['name']} |" in text and f"{s['train_tokens']:,}" in text
    tokens = src.state["tokens_seen"]
    flops = tokens * flops_per_token(src.cfg.model, src.cfg.seq_len)["training"]
    assert f"{tokens:,} tokens" in text and f"{flops:.3e} FLOPs" in text
    assert f"| parameters | {src.model.num_params():,} |" in text


def test_model_card_of_a_chat_model_counts_both_stages(run_factory, tmp_path):
    run = run_factory(chat=True)
    out = tmp_path / "hf"
    export_hf(run, out, which="chat")
    text = (out / "README.md").read_text()
    assert "chat" in front_matter(text)["tags"] and "model-index" not in front_matter(text)
    assert "- pretrain: 5,000 tokens" in text and "- sft: 500 tokens" in text
    assert "No evaluation recorded" in text and "Not recorded" in text
