"""rl.keep_best: the model handed on is the evaluated one at its best in-run evaluation, and a
resumed run selects exactly what a straight one does."""

import io
import json

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from spud.posttrain import rl_eval
from spud.posttrain.rl import rl_cmd
from spud.posttrain.verifiers import Verdict
from spud.train.metrics import read_metrics
from test_rl import FAST, quiet, seven_task

# What the stub verifier says at each evaluation (steps 0..4), for the two samples of the one
# held-out problem: pass@1 0, 1, 0.5, 1, 0 -> step 1 is the best until step 3 ties it (a tie goes
# to the later step), and step 4 falls below.
SCRIPT = [(False, False), (True, True), (True, False), (True, True), (False, False)]


def scripted_verifier():
    calls = iter([v for pair in SCRIPT for v in pair])
    return lambda *args: Verdict(next(calls), True)


def weights(run, step, name="model.safetensors"):
    return load_file(run / "checkpoints" / f"step_{step:07d}" / name)


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("ema", [0.0, 0.5])
def test_keep_best_hands_on_the_best_evaluated_model_and_resumes_exactly(base_run, tmp_path, monkeypatch, ema):
    task = seven_task(tmp_path / "seven.jsonl")
    fast = FAST + ["rl.lr=0.01", "rl.checkpoint_every=1", "rl.keep_checkpoints=10", "rl.eval_every=1",
                   "rl.eval_samples=2", "rl.keep_best=true", f"rl.ema_decay={ema}"]
    evaluated = "average.safetensors" if ema else "train.safetensors"  # what the evaluations scored
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    monkeypatch.setattr(rl_eval, "verify", scripted_verifier())
    out = rl_cmd(str(base_run), source="base", tasks=[task], out=str(straight), overrides=fast + ["rl.steps=4"],
                 console=quiet())
    assert out["best"] == {"step": 3, "score": 1.0}
    evals = [r for r in read_metrics(straight / "metrics.jsonl") if r["kind"] == "rl_eval"]
    assert [r["pass@1"] for r in evals] == [0.0, 1.0, 0.5, 1.0, 0.0]
    assert [r["best_step"] for r in evals] == [0, 1, 1, 3, 3]
    assert all(r["samples"] == 2 and r["temperature"] == 1.0 and "pass@2" in r for r in evals)
    for step, chosen in ((1, 1), (2, 1), (3, 3), (4, 3)):
        # serve/eval/export read model.safetensors: the evaluated weights of the best step so far
        assert same(weights(straight, step), weights(straight, chosen, evaluated)), step
        state = json.loads((straight / "checkpoints" / f"step_{step:07d}" / "state.json").read_text())
        assert state["rl_best"] == {"step": chosen, "score": 1.0}
    assert not same(weights(straight, 2, evaluated), weights(straight, 1, evaluated))  # it went on training
    assert not same(weights(straight, 4, evaluated), weights(straight, 3, evaluated))

    # stopped at step 2 and resumed: the same selection, the same policy (and average)
    monkeypatch.setattr(rl_eval, "verify", scripted_verifier())
    rl_cmd(str(base_run), source="base", tasks=[task], out=str(cut), overrides=fast + ["rl.steps=2"], console=quiet())
    resumed = rl_cmd(str(base_run), source="base", tasks=None, out=str(cut), overrides=["rl.steps=4"], resume=True,
                     console=quiet())
    assert resumed["best"] == {"step": 3, "score": 1.0}
    names = ["model.safetensors", "train.safetensors"] + (["average.safetensors"] if ema else [])
    for name in names:
        assert same(weights(straight, 4, name), weights(cut, 4, name)), name


def test_keep_best_with_the_average_resumes_from_a_checkpoint_without_selection(base_run, tmp_path, monkeypatch):
    """Turned on at resume: the average goes on from the saved one (model.safetensors there), and the
    selection starts unscored, so the first evaluation after the resume is kept."""
    task = seven_task(tmp_path / "seven.jsonl")
    fast = FAST + ["rl.lr=0.01", "rl.ema_decay=0.5"]
    run = tmp_path / "run"
    rl_cmd(str(base_run), source="base", tasks=[task], out=str(run), overrides=fast + ["rl.steps=2"], console=quiet())
    saved_avg = weights(run, 2)
    monkeypatch.setattr(rl_eval, "verify", lambda *a: Verdict(False, True))
    console = Console(file=io.StringIO(), width=200)
    out = rl_cmd(str(base_run), source="base", tasks=None, out=str(run),
                 overrides=["rl.steps=3", "rl.keep_best=true", "rl.eval_every=1"], resume=True, console=console)
    assert out["best"] == {"step": 3, "score": 0.0}
    said = console.file.getvalue()
    assert "chooses the model on the held-out (test) split" in said  # this task has no dev split
    assert "handing on the model of step 3" in said
    policy3, avg3 = weights(run, 3, "train.safetensors"), weights(run, 3, "average.safetensors")
    assert all(torch.allclose(avg3[k], 0.5 * saved_avg[k] + 0.5 * policy3[k], atol=1e-6) for k in avg3)
    assert same(weights(run, 3), avg3)
