"""Training as a user sees it: run directory contents, metrics, checkpoints, exact resume."""

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from spud.errors import SpudError
from spud.train.checkpoint import list_checkpoints
from spud.train.metrics import read_metrics
from spud.train.trainer import Trainer


def train(cfg, run, resume=False, **overrides):
    if overrides:
        cfg = cfg.model_copy(deep=True)
        for k, v in overrides.items():
            section, key = k.split("__")
            setattr(getattr(cfg, section), key, v)
    return Trainer(cfg, run, resume=resume).run()


def losses(run):
    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"}


def test_run_directory_layout_and_metrics(tiny_cfg, fresh_run):
    summary = train(tiny_cfg, fresh_run)
    assert summary["step"] == 12
    for name in ("config.yaml", "tokenizer.json", "data/manifest.json", "metrics.jsonl"):
        assert (fresh_run / name).is_file(), name
    ckpts = [p.name for p in list_checkpoints(fresh_run)]
    assert ckpts == ["step_0000004", "step_0000008", "step_0000012"]
    ck = fresh_run / "checkpoints" / "step_0000012"
    assert {"model.safetensors", "optimizer.pt", "rng.pt", "state.json"} <= {p.name for p in ck.iterdir()}
    assert load_file(ck / "model.safetensors")  # plain safetensors, readable without spud
    records = read_metrics(fresh_run / "metrics.jsonl")
    assert all("step" in r and r["kind"] in {"train", "val", "sample", "event"} for r in records)
    train_recs = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_recs] == list(range(1, 13))
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "tokens"):
        assert all(isinstance(r[key], float | int) for r in train_recs), key
    vals = [r for r in records if r["kind"] == "val"]
    assert [r["step"] for r in vals] == [0, 4, 8, 12]
    assert vals[-1]["loss"] < vals[0]["loss"] and vals[-1]["bpb"] < vals[0]["bpb"]
    assert any(r["kind"] == "sample" and r["step"] == 12 for r in records)


def test_resume_reproduces_uninterrupted_run_exactly(tiny_cfg, fresh_run, tmp_path):
    cfg = tiny_cfg.model_copy(deep=True)
    cfg.model.dropout = 0.1  # resume must also restore the RNG that draws dropout masks
    cfg.train.tokens_per_step = 2 * cfg.train.micro_batch_size * cfg.model.max_seq_len  # grad accum
    straight = tmp_path / "straight"
    shutil.copytree(fresh_run, straight)
    Trainer(cfg, straight).run()

    Trainer(cfg, fresh_run).run()
    for late in ("step_0000008", "step_0000012"):  # as if the run died right after step 4's save
        shutil.rmtree(fresh_run / "checkpoints" / late)
    summary = Trainer(cfg, fresh_run, resume=True).run()
    assert summary["step"] == 12
    assert losses(fresh_run) == losses(straight)  # exactly equal floats, steps 1..12
    a = load_file(straight / "checkpoints" / "step_0000012" / "model.safetensors")
    b = load_file(fresh_run / "checkpoints" / "step_0000012" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    events = [r["event"] for r in read_metrics(fresh_run / "metrics.jsonl") if r["kind"] == "event"]
    assert "resume" in events


def test_resume_refuses_a_different_model(tiny_cfg, fresh_run):
    train(tiny_cfg, fresh_run)
    cfg = tiny_cfg.model_copy(deep=True)
    cfg.model.n_layers = 3
    with pytest.raises(SpudError, match=r"n_layers: checkpoint has 2, requested 3"):
        Trainer(cfg, fresh_run, resume=True)


def test_fresh_run_refuses_to_overwrite_checkpoints(tiny_cfg, fresh_run):
    train(tiny_cfg, fresh_run)
    with pytest.raises(SpudError, match="--resume"):
        Trainer(tiny_cfg, fresh_run)


def _spud(*args):
    return [sys.executable, "-m", "spud", *args]


def _signal_run_args(max_steps: int) -> list[str]:
    """A tiny `spud train` long enough to be interrupted, with no checkpoint of its own before."""
    return ["tiny", "data.total_tokens=60000", "tokenizer.vocab_size=400", "tokenizer.train_bytes=200000",
            "model.max_seq_len=32", "train.micro_batch_size=4", f"train.max_steps={max_steps}",
            "train.checkpoint_every=1000", "train.eval_every=1000", "train.eval_batches=1"]


def _train_until(run, args: list[str], steps_logged: int) -> subprocess.Popen:
    """Start `spud train` in a subprocess and return once it has logged `steps_logged` steps."""
    proc = subprocess.Popen(_spud("train", *args, "--out", str(run)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(losses(run)) < steps_logged:
        time.sleep(0.05)
    return proc


def test_ctrl_c_saves_a_checkpoint_and_resume_matches(fresh_run, tmp_path):
    common = _signal_run_args(200)
    straight = tmp_path / "straight"
    shutil.copytree(fresh_run, straight)
    proc = _train_until(fresh_run, common, steps_logged=5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    ckpts = list_checkpoints(fresh_run)
    assert len(ckpts) == 1
    stopped_at = json.loads((ckpts[0] / "state.json").read_text())["step"]
    assert 5 <= stopped_at < 200
    r = subprocess.run(_spud("train", "--resume", "--out", str(fresh_run)), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(_spud("train", *common, "--out", str(straight)), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert losses(fresh_run) == losses(straight)


def test_training_without_validation_split(tiny_cfg, tmp_path):
    cfg = tiny_cfg.model_copy(deep=True)
    cfg.data.val_fraction = 0.0
    cfg.data.total_tokens = 20000
    cfg.train.max_steps = 4
    summary = Trainer(cfg, tmp_path / "noval").run()
    assert summary["step"] == 4 and summary["val"] == []


def test_cpu_peak_measured_under_load_is_raised_so_mfu_stays_at_most_one(tiny_cfg, fresh_run, tmp_path,
                                                                          monkeypatch):
    # A peak cached while other jobs held the cores (here absurdly low) must not give MFU > 100 %:
    # the first step that beats it proves it wrong, and the cache is raised for later runs too.
    from spud import hardware

    monkeypatch.setenv("SPUD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("SPUD_PEAK_FLOPS", raising=False)
    key = f"{hardware.cpu_name()}|threads={torch.get_num_threads()}|float32"
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "peak_flops.json").write_text(json.dumps({key: 1000.0}))
    monkeypatch.setattr(hardware, "measure_matmul_flops", lambda **kw: 2000.0)  # still "under load"
    train(tiny_cfg, fresh_run)
    mfus = [r["mfu"] for r in read_metrics(fresh_run / "metrics.jsonl") if r["kind"] == "train"]
    assert len(mfus) == 12 and all(0 < m <= 1.0 for m in mfus), mfus
    raised = json.loads((tmp_path / "cache" / "peak_flops.json").read_text())[key]
    assert raised > 1e6  # at least the model FLOP/s the run really did, not the 1 kFLOP/s cached


def test_sigterm_twice_still_saves_a_checkpoint(fresh_run):
    """`timeout` signals the child and then its process group, so a run gets SIGTERM twice: it must
    still stop at a step boundary with a checkpoint (a second Ctrl-C, by contrast, aborts)."""
    proc = _train_until(fresh_run, _signal_run_args(500), steps_logged=3)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    (ckpt,) = list_checkpoints(fresh_run)
    assert 3 <= json.loads((ckpt / "state.json").read_text())["step"] < 500
