"""A damaged checkpoint, as a user meets it through the CLI: the damaged file is named, and
resume/sample fall back to the newest intact checkpoint; with none intact, a clear error."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from spud.cli import main
from spud.errors import SpudError
from spud.train import checkpoint as ckpt_io
from spud.train.metrics import read_metrics
from spud.train.trainer import Trainer

LAST = "step_0000012"


@pytest.fixture(scope="module")
def trained(tiny_cfg, built_run, tmp_path_factory):
    """One tiny run with checkpoints at steps 4, 8 and 12 (copied by each test before damage)."""
    run = tmp_path_factory.mktemp("damage") / "run"
    run.mkdir()
    shutil.copy(built_run / "tokenizer.json", run / "tokenizer.json")
    shutil.copytree(built_run / "data", run / "data")
    Trainer(tiny_cfg, run).run()
    assert [p.name for p in ckpt_io.list_checkpoints(run)] == ["step_0000004", "step_0000008", LAST]
    return run


@pytest.fixture
def run(trained, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


def _truncate(path):
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 2)


DAMAGE = {
    "model.safetensors": _truncate,
    "optimizer.pt": _truncate,
    "rng.pt": lambda p: p.write_bytes(os.urandom(2000)),
    "state.json": lambda p: p.write_text('{"step": 12, "tokens_seen": '),
}


@pytest.fixture
def spud(capsys):
    """`spud ARGS` through the CLI's entry point, in this process for `train` (no interpreter
    start-up): (exit code, stdout + stderr as one unwrapped line)."""
    def run(*args):
        if args[0] == "sample":  # sample_to_terminal binds sys.stdout at import: a real process
            r = subprocess.run([sys.executable, "-m", "spud", *args], capture_output=True, text=True, timeout=300)
            return r.returncode, " ".join((r.stdout + r.stderr).split())
        capsys.readouterr()
        rc = main(list(args))
        out = capsys.readouterr()
        return rc, " ".join((out.out + out.err).split())
    return run


@pytest.mark.parametrize("name", list(DAMAGE))
def test_resume_falls_back_past_a_damaged_file(run, name, spud):
    damaged = run / "checkpoints" / LAST / name
    DAMAGE[name](damaged)
    rc, out = spud("train", "--resume", "--out", str(run))
    assert rc == 0, out
    assert out.count(f"warning: checkpoint {LAST} is damaged: {damaged}") == 1
    assert "Falling back to step_0000008" in out
    assert f"resuming from step 8 ({run / 'checkpoints' / 'step_0000008'})" in out
    assert "Traceback" not in out
    events = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "event"]
    assert [(e["event"], e["step"]) for e in events if e["event"] == "resume"] == [("resume", 8)]
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"] == list(range(1, 13))
    assert ckpt_io.checkpoint_problems(run / "checkpoints" / LAST, training=True) == []  # re-saved whole


@pytest.mark.parametrize("name, falls_back", [("model.safetensors", True), ("optimizer.pt", False)])
def test_sample_skips_only_what_it_needs(run, name, falls_back, spud):
    """Sampling reads weights and state.json only: a damaged optimizer/RNG file does not matter."""
    damaged = run / "checkpoints" / LAST / name
    DAMAGE[name](damaged)
    rc, out = spud("sample", str(run), "--max-tokens", "4", "--seed", "0")
    assert rc == 0, out
    if falls_back:
        assert out.count(f"warning: checkpoint {LAST} is damaged: {damaged}") == 1
        assert out.endswith("[step_0000008]")
    else:
        assert "warning" not in out and out.endswith(f"[{LAST}]")


def test_every_checkpoint_damaged_is_a_clear_error(run, spud):
    for step in ("step_0000004", "step_0000008", LAST):
        _truncate(run / "checkpoints" / step / "model.safetensors")
    for args in (("train", "--resume", "--out", str(run)), ("sample", str(run), "--max-tokens", "2")):
        rc, out = spud(*args)
        assert rc != 0 and "Traceback" not in out
        assert "no intact checkpoint; every one is damaged" in out
        for step in ("step_0000004", "step_0000008", LAST):
            assert f"{run / 'checkpoints' / step / 'model.safetensors'} is damaged" in out


def test_an_explicitly_chosen_damaged_checkpoint_is_refused(run):
    _truncate(run / "checkpoints" / "step_0000008" / "optimizer.pt")
    with pytest.raises(SpudError, match=r"checkpoint step_0000008 is damaged: .*step_0000008/optimizer.pt "
                                        r"has [\d,]+ bytes, [\d,]+ when written"):
        ckpt_io.resolve_checkpoint(run, 8, training=True)
    assert ckpt_io.resolve_checkpoint(run, 8) == run / "checkpoints" / "step_0000008"  # weights are fine


def test_checks_cover_sizes_keys_and_step(run):
    ck = run / "checkpoints" / LAST
    assert ckpt_io.checkpoint_problems(ck, training=True) == []
    state = json.loads((ck / "state.json").read_text())
    assert set(state["files"]) == {"model.safetensors", "optimizer.pt", "rng.pt"}
    (ck / "rng.pt").write_bytes((ck / "rng.pt").read_bytes() + b"\0")  # grown, still loads
    del state["loader"]
    state["step"] = 11
    (ck / "state.json").write_text(json.dumps(state))
    assert ckpt_io.checkpoint_problems(ck, training=True) == [
        f"{ck}/state.json lacks loader",
        f"{ck}/rng.pt has {state['files']['rng.pt'] + 1:,} bytes, {state['files']['rng.pt']:,} when written (truncated?)",
    ]
    # sampling/serving need neither the loader position nor the RNG state
    assert ckpt_io.checkpoint_problems(ck) == [f"{ck}/state.json says step 11, not 12"]


def test_sharded_checkpoint_without_complete_marker_or_metadata(tmp_path):
    ck = tmp_path / "checkpoints" / "step_0000005"
    ck.mkdir(parents=True)
    (ck / "state.json").write_text(json.dumps({"step": 5, "config": {}, "sharded": True}))
    (ck / ".metadata").write_bytes(b"")
    assert ckpt_io.checkpoint_problems(ck) == [
        f"{ck}/COMPLETE marker is missing (the save did not finish)",
        f"{ck}/.metadata is missing or empty",
        f"{ck}/no *.distcp shard files",
    ]


def test_resume_takes_the_checkpoint_config_over_a_cut_off_config_yaml(tiny_cfg, fresh_run, spud):
    """config.yaml cut off by a crash must not resume with defaults (max_steps=200)."""
    cfg = tiny_cfg.model_copy(deep=True)
    cfg.train.max_steps = 8
    cfg.train.checkpoint_every = 4
    Trainer(cfg, fresh_run).run()
    # continue to 10 with an override, then cut config.yaml off mid-file
    text = (fresh_run / "config.yaml").read_text()
    (fresh_run / "config.yaml").write_text(text[: text.index("max_steps")])
    rc, out = spud("train", "--resume", "--out", str(fresh_run), "train.max_steps=10")
    assert rc == 0, out
    assert f"{fresh_run / 'config.yaml'} differs from the config stored in step_0000008" in out
    assert "train.max_steps: step_0000008 has 8, config.yaml has 200" in out
    assert "resuming with a config that differs from step_0000008's: train.max_steps: was 8, now 10" in out
    assert [p.name for p in ckpt_io.list_checkpoints(fresh_run)][-1] == "step_0000010"
    assert yaml.safe_load((fresh_run / "config.yaml").read_text())["train"]["max_steps"] == 10
    # and once more without overrides: the checkpoint's max_steps (10) rules, nothing to do
    (fresh_run / "config.yaml").write_text("train: {max_steps: 3\n")  # not even valid YAML
    rc, out = spud("train", "--resume", "--out", str(fresh_run))
    assert rc == 0, out
    assert "config.yaml is unreadable or invalid" in out and "resuming with the config stored in step_0000010" in out
    assert "step_0000010 is at step 10 >= train.max_steps; nothing to do" in out
