"""The `spud` command as a user runs it: help for every verb, clear errors, no tracebacks."""

import subprocess
import sys

import pytest

from spud.cli import main

VERBS = [["data", "build"], ["tokenizer", "train"], ["tokenizer", "encode"], ["train"], ["sample"], ["serve"], ["chat"], ["eval"], ["plan"], ["ladder"], ["fit"], ["report"], ["export-weights"], ["sft"],
         ["demo"], ["info"]]


def run_cli(*args, timeout=300, **kw):
    return subprocess.run([sys.executable, "-m", "spud", *args], capture_output=True, text=True,
                          timeout=timeout, **kw)


def test_top_level_help():
    r = run_cli("--help")
    assert r.returncode == 0
    for verb in ("data", "tokenizer", "train", "sample", "demo", "info"):
        assert verb in r.stdout


@pytest.mark.parametrize("verb", VERBS, ids=lambda v: " ".join(v))
def test_verb_help(verb, capsys):
    with pytest.raises(SystemExit) as e:
        main([*verb, "--help"])
    assert e.value.code == 0
    assert "usage: spud " + " ".join(verb) in capsys.readouterr().out


def test_unknown_config_key_is_a_clean_error(tmp_path):
    r = run_cli("train", "tiny", "model.n_layer=3", "--out", str(tmp_path / "r"))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "model.n_layer" in r.stderr and "did you mean 'n_layers'" in r.stderr
    assert not (tmp_path / "r").exists()


def test_missing_data_path_fails_before_any_work(tmp_path):
    r = run_cli("data", "build", "tiny", "data.sources.0.type=text",
                f"data.sources.0.path={tmp_path / 'nowhere'}", "--out", str(tmp_path / "r"))
    assert r.returncode == 2, r.stderr
    assert "nowhere" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "r" / "tokenizer.json").exists()


def test_unknown_recipe_lists_builtins(tmp_path):
    r = run_cli("train", "nonesuch", "--out", str(tmp_path / "r"))
    assert r.returncode == 2 and "demo" in r.stderr and "tiny" in r.stderr


def test_info_presets():
    r = run_cli("info", "--model", "all")
    assert r.returncode == 0, r.stderr
    for name in ("nano", "gpt2-124m", "1b"):
        assert name in r.stdout
    r = run_cli("info", "--model", "nope")
    assert r.returncode == 2 and "known" in r.stderr


def test_overrides_after_options(tmp_path, built_run):
    # `--out RUN key=value` order works too
    r = run_cli("tokenizer", "encode", str(built_run), "12 + 7 = 19")
    assert r.returncode == 0, r.stderr
    assert "'1'" in r.stdout
    r = run_cli("train", "tiny", "--out", str(tmp_path / "r"), "train.bogus=1")
    assert r.returncode == 2 and "train.bogus" in r.stderr


def test_data_build_then_info(tmp_path):
    run = tmp_path / "r"
    r = run_cli("data", "build", "tiny", "data.total_tokens=30000", "tokenizer.vocab_size=300",
                "tokenizer.train_bytes=100000", "--no-progress", "--out", str(run))
    assert r.returncode == 0, r.stderr
    import json

    manifest = json.loads((run / "data" / "manifest.json").read_text())
    names = [s["name"] for s in manifest["sources"]]
    assert names == ["stdlib_docs", "arithmetic"]
    assert manifest["dtype"] == "uint16" and manifest["train_tokens"] > 0
    assert (run / "tokenizer.json").is_file()
    r = run_cli("info", str(run))
    assert r.returncode == 0, r.stderr
    assert "stdlib_docs" in r.stdout and "arithmetic" in r.stdout


def test_plan_from_budget_writes_json(tmp_path):
    import json

    out = tmp_path / "plan.json"
    r = run_cli("plan", "--budget", "1e21", "--json", str(out))
    assert r.returncode == 0, r.stderr
    assert "N* / D*" in r.stdout
    plan = json.loads(out.read_text())
    assert plan["budget"] == {"flops": 1e21, "source": "budget"}
    n, d = plan["train"]["N_star"], plan["train"]["D_star"]
    assert abs(6 * n * d / 1e21 - 1) < 1e-6  # the compute-optimal point spends the whole budget
