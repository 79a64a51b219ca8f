"""SIGKILL at random moments (mid-step, mid-checkpoint-write, mid-startup), then --resume, over
and over: the run must end bit-identical to one that was never interrupted, and every checkpoint
that `list_checkpoints` offers must be complete and loadable at every point."""

import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from tiny_recipe import TINY_OVERRIDES
from safetensors.torch import load_file

from spud.config import load_config
from spud.train.checkpoint import latest_checkpoint, list_checkpoints
from spud.train.trainer import Trainer

ROOT = Path(__file__).parents[2]
STEPS = 120  # enough that 8 kills land before the end even on a fast, idle machine
OVERRIDES = [*TINY_OVERRIDES, f"train.max_steps={STEPS}", "train.checkpoint_every=1",
             "train.keep_checkpoints=2", "train.eval_every=1000", "train.eval_batches=1",
             "train.sample_tokens=4", "train.threads=1"]
KILLS = 8


def _assert_all_listed_checkpoints_load(run: Path) -> None:
    for ck in list_checkpoints(run):
        state = json.loads((ck / "state.json").read_text())
        assert state["step"] == int(ck.name.split("_")[1])
        assert load_file(ck / "model.safetensors")
        assert torch.load(ck / "optimizer.pt", weights_only=True)["state"]
        assert torch.load(ck / "rng.pt", weights_only=True)


def _latest_step(run: Path) -> int:
    last = latest_checkpoint(run)
    return int(last.name.split("_")[1]) if last else 0


def test_sigkill_loop_resumes_bit_exact(fresh_run, tmp_path):
    config = ROOT / "configs" / "tiny.yaml"
    straight = tmp_path / "straight"
    shutil.copytree(fresh_run, straight)
    Trainer(load_config(config, OVERRIDES), straight).run()

    cmd = [sys.executable, "-m", "spud", "train", str(config), *OVERRIDES, "--out", str(fresh_run), "--resume"]
    rng = random.Random(1234)
    kills, steps_at_kill, t_end = 0, [], time.time() + 50
    while kills < KILLS and time.time() < t_end:
        before = _latest_step(fresh_run)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if kills % 4 == 3:  # now and then during startup / restore
            time.sleep(rng.uniform(0.2, 1.5))
        else:  # otherwise once training runs again: mid-step or mid-checkpoint-write
            deadline = time.time() + 20
            while _latest_step(fresh_run) <= before and proc.poll() is None and time.time() < deadline:
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.15))
        if proc.poll() is not None:  # finished before the kill: nothing left to interrupt
            break
        proc.kill()
        proc.wait()
        kills += 1
        _assert_all_listed_checkpoints_load(fresh_run)
        steps_at_kill.append(_latest_step(fresh_run))
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert kills >= 3, f"only {kills} kills landed (machine too slow/fast?)"
    assert steps_at_kill[-1] > 0, steps_at_kill  # the kills did interrupt training, not only startup
    a = load_file(straight / "checkpoints" / f"step_{STEPS:07d}" / "model.safetensors")
    b = load_file(fresh_run / "checkpoints" / f"step_{STEPS:07d}" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), steps_at_kill
