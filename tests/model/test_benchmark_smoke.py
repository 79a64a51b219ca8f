"""The throughput benchmark runs end to end (tiny sizes) and writes its JSON."""

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")
SCRIPT = Path(__file__).parents[2] / "benchmarks" / "train_throughput.py"


def test_train_throughput_smoke(tmp_path, monkeypatch):
    monkeypatch.setenv("SPUD_PEAK_FLOPS", "1e11")  # skip the 1 s CPU peak measurement
    spec = importlib.util.spec_from_file_location("train_throughput", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "r.json"
    argv = ["--presets", "nano", "--vocab", "512", "--batch", "1", "--seq", "16",
            "--rounds", "2", "--steps", "1", "--warmup", "1", "--out", str(out)]
    assert mod.main(argv) == 0
    (res,) = json.loads(out.read_text())["results"]
    assert res["preset"] == "nano" and res["ratio"] > 0 and res["max_abs_logit_diff"] < 1e-4
    assert len(res["spud"]["tokens_per_s_rounds"]) == 2 and res["hf"]["mfu"] > 0
