"""Data-parallel spud rl (spud.posttrain.rl_dist), launched as users launch it: torchrun -m spud rl
with 2 gloo ranks gives a single process's rollouts, rewards and metrics, and its weights."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_rl import FAST, half_task, odd_length_verdict, quiet, seven_task

from spud.config_sections import TrainConfig
from spud.errors import SpudError
from spud.posttrain.rl import rl_cmd
from spud.posttrain.rl_dist import RLDist
from spud.train.metrics import read_metrics

# dynamic sampling on (the default), 2 micro-batches a step so each rank runs its own
STEPS = ["rl.steps=3", "rl.lr=0.01", "rl.micro_batch_size=8", "rl.eval_every=3", "rl.checkpoint_every=3"]


# With rl.carry_surplus the ranks must also agree on the groups carried into the next step and on
# their sampling log-probs. A random-init model almost never says seven, so that run is judged by
# test_rl's stub verifier, patched into every rank by a launcher script, so that groups with
# signal overshoot the quota.
STUB_LAUNCHER = f"""import sys
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
from test_rl import odd_length_verdict
from spud.cli import main
from spud.posttrain import rl
rl.verify = odd_length_verdict
sys.exit(main())
"""


@pytest.mark.parametrize("carry", [False, True], ids=["plain", "carry"])
def test_two_ranks_match_one_process(base_run, tmp_path, carry, monkeypatch):
    extra, entry = [], ["-m", "spud"]
    if carry:
        from spud.posttrain import rl as rl_module

        monkeypatch.setattr(rl_module, "verify", odd_length_verdict)
        (tmp_path / "stub_spud.py").write_text(STUB_LAUNCHER)
        # micro-batches of 4: a carried group (8 rows, at the batch's head) spans both ranks' shares
        extra, entry = ["rl.carry_surplus=true", "rl.micro_batch_size=4"], [str(tmp_path / "stub_spud.py")]
    task = half_task(tmp_path / "half.jsonl") if carry else seven_task(tmp_path / "seven.jsonl")
    single = tmp_path / "single"
    rl_cmd(str(base_run), source="base", tasks=[task], out=str(single), overrides=FAST + STEPS + extra,
           console=quiet())
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *entry,
           "rl", str(base_run), "--from", "base", "--tasks", task, "--out", str(two), *FAST, *STEPS, *extra,
           "train.parallel=ddp", "train.dist_timeout_s=60"]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                       timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("rl step 1/3") == 1  # only rank 0 talks

    def rows(run, kind):
        return [x for x in read_metrics(run / "metrics.jsonl") if x["kind"] == kind]

    a, b = rows(single, "rl"), rows(two, "rl")
    assert len(a) == len(b) == 3 and sum(not x["skipped"] for x in a) >= 2  # steps that did update
    for x, y in zip(a, b):
        for k in ("reward", "accuracy", "response_length", "rollouts", "groups_kept", "groups_sampled",
                  "sequences", "verifier_errors", "groups_carried"):
            assert x.get(k) == y.get(k), (k, x.get(k), y.get(k))  # the same rollouts, gathered on every rank
        for k in ("loss", "entropy", "clip_fraction", "policy_drift"):
            assert (x[k] is None and y[k] is None) or x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-7), k
    if carry:  # groups were carried into a step, so the ranks had to agree on them
        assert any(x["groups_carried"] for x in a), [x["groups_carried"] for x in a]
    evals = [x.get("pass@1") for x in rows(single, "rl_eval")]
    assert evals == [x.get("pass@1") for x in rows(two, "rl_eval")]
    assert evals and (carry or None not in evals), evals  # the seven task has held-out problems; half_task none
    wa = load_file(single / "checkpoints" / "step_0000003" / "model.safetensors")
    wb = load_file(two / "checkpoints" / "step_0000003" / "model.safetensors")
    assert wa.keys() == wb.keys()
    worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    # summed gradients differ from one process's only in rounding, which Adam's normalised step
    # magnifies where a gradient is near zero (more micro-batches, more of it: 1.1e-5 seen with 8)
    assert worst < 3e-5, worst
    assert any(not torch.equal(wa[k], load_file(next((base_run / "checkpoints").glob("step_*"))
                                                / "model.safetensors")[k]) for k in wa)  # it trained


def test_rl_refuses_fsdp(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(SpudError, match="train.parallel=ddp"):
        RLDist(TrainConfig(parallel="fsdp"))


def test_rl_target_stops_each_seed_at_its_budget_and_reports_the_gain(base_run, tmp_path):
    """benchmarks/rl_target.py: torchrun-launched runs stopped by the clock (SIGTERM to the ranks,
    a checkpoint at the step's end), then the start and every seed measured on the same problems;
    an existing run is never overwritten."""
    task = seven_task(tmp_path / "seven.jsonl")
    report = tmp_path / "target.json"
    cmd = [sys.executable, "benchmarks/rl_target.py", str(base_run), "--from", "base", "--tasks", task,
           "--seeds", "5", "--budget-s", "20", "--split", "heldout", "--problems", "1", "--samples", "2",
           "--threads", "1", "--out", str(report),
           *[x for o in FAST + ["rl.eval_split=heldout", "train.dist_timeout_s=60", "rl.eval_every=1"]
             for x in ("--set", o)]]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    got = json.loads(report.read_text())
    run = got["runs"][0]
    assert run["stopped_by_budget"] and run["steps"] >= 1 and run["wall_s"] >= 20, run
    out = base_run / "rl_target_5"
    events = [x for x in read_metrics(out / "metrics.jsonl") if x["kind"] == "event"]
    assert [e["event"] for e in events] == ["interrupt"], events  # stopped by the signal, at a step's end
    assert (out / "checkpoints" / f"step_{run['steps']:07d}").is_dir()  # saved on the way out
    assert got["start"]["model"] == "base" and "sampled_pass@1" in got["summary"]
    assert got["summary"]["target"]["metric"] == "sampled_pass@1"
    assert "target: +10 points of sampled_pass@1" in r.stdout and "rl seed 5" in r.stdout
    assert {"rl.lr=2e-4", "rl.keep_best=true"} <= set(got["recipe"]) and got["recipe"][-1] == "rl.eval_every=1"
    # the recipe's rl.keep_best: the step handed on is one the run evaluated
    best = [x["best_step"] for x in read_metrics(out / "metrics.jsonl") if x["kind"] == "rl_eval"][-1]
    assert run["best_step"] == best <= run["steps"] and f"(hands on step {best})" in r.stdout
    # a second launch refuses to overwrite the run; --eval-only measures it again
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert again.returncode != 0 and "already exist" in again.stderr and str(out) in again.stderr
    assert (out / "checkpoints" / f"step_{run['steps']:07d}").is_dir()
    remeasured = subprocess.run(cmd + ["--eval-only"], capture_output=True, text=True, timeout=300)
    assert remeasured.returncode == 0, remeasured.stderr[-3000:]
    assert json.loads(report.read_text())["runs"][0]["sampled_pass@1"] == run["sampled_pass@1"]
    assert json.loads(report.read_text())["runs"][0]["best_step"] == best
    # a run that fails before its budget is an error that says so, never a figure
    broken = subprocess.run(cmd + ["--prefix", "broken", "--set", "rl.group=1"], capture_output=True, text=True,
                            timeout=300)
    assert broken.returncode != 0 and "failed after" in broken.stderr and "rl.group" in broken.stderr
