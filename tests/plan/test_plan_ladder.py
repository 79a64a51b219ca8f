"""A tiny ladder end to end: 2 sizes × 2 token budgets on the tiny recipe, then a fit."""

import json
from pathlib import Path

from spud.plan.fit import fit_cmd
from spud.plan.ladder import ladder_cmd, register_run

TINY = str(Path(__file__).parents[2] / "configs" / "tiny.yaml")
OVERRIDES = [
    "data.total_tokens=40000", "tokenizer.vocab_size=300", "tokenizer.train_bytes=100000",
    "model.max_seq_len=32", "train.micro_batch_size=4", "train.eval_batches=1",
    "train.sample_tokens=4", "train.threads=1",
]


def test_tiny_ladder_then_fit(tmp_path):
    out = tmp_path / "ladder"
    res = ladder_cmd(config=TINY, sizes="32,64", tokens="640,1280", out=str(out), overrides=OVERRIDES)
    rows = res["runs"]
    assert len(rows) == 4
    assert {r["name"] for r in rows} == {"32_640", "32_1280", "64_640", "64_1280"}
    for r in rows:
        assert r["D"] in (640, 1280) and r["N"] > 0 and r["C"] > 0 and r["loss"] > 0
    assert len({r["N"] for r in rows}) == 2
    # rerunning skips finished rungs; registering again replaces, never duplicates
    ladder_cmd(config=TINY, sizes="32", tokens="640", out=str(out), overrides=OVERRIDES)
    register_run(out / "ladder.jsonl", out / "32_640")
    lines = (out / "ladder.jsonl").read_text().splitlines()
    assert len(lines) == 4

    fit = fit_cmd(ladder=str(out / "ladder.jsonl"), out=str(tmp_path / "fit"), bootstrap=3)
    data = json.loads((tmp_path / "fit" / "fit.json").read_text())
    assert set(data["law"]) >= {"E", "A", "B", "alpha", "beta"}
    for name in ("observed_vs_predicted.png", "isoflop.png", "frontier.png"):
        assert (tmp_path / "fit" / name).stat().st_size > 1000
    assert fit["n_runs"] == 4
