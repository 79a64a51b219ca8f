"""Data parallel training on CPU (gloo), launched the way users launch it: torchrun -m spud train.

The same global batch must give the same loss curve whether it is computed by one process or
split over 2 ranks (DDP replicating, FSDP sharding), and a sharded checkpoint must resume at a
different number of ranks (2 → 1 and 1 → 2) as if nothing had happened.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spud.train.checkpoint import is_sharded, list_checkpoints
from spud.train.metrics import read_metrics
from spud.train.trainer import Trainer

from tiny_recipe import TINY_OVERRIDES

ROOT = Path(__file__).parents[2]
STEPS = 20
PER_RANK = 2  # micro-batch per rank; the single process uses 2 × this (same global batch)
SEQ = 32
COMMON = [*TINY_OVERRIDES, f"train.max_steps={STEPS}", "train.checkpoint_every=10", "train.eval_every=10",
          f"train.tokens_per_step={2 * 2 * PER_RANK * SEQ}", "train.sample_tokens=4"]  # accum 2
TOL = 1e-5


def torchrun(run: Path, *overrides: str, resume: bool = False, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "spud", "train", str(ROOT / "configs" / "tiny.yaml"), *COMMON,
           f"train.micro_batch_size={PER_RANK}", "train.dist_timeout_s=60", *overrides, "--out", str(run)]
    if resume:
        cmd.append("--resume")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def single_cfg(tiny_cfg):
    cfg = tiny_cfg.model_copy(deep=True)
    t = cfg.train
    t.max_steps, t.checkpoint_every, t.eval_every = STEPS, 10, 10
    t.micro_batch_size, t.tokens_per_step, t.sample_tokens = 2 * PER_RANK, 2 * 2 * PER_RANK * SEQ, 4
    return cfg


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"}


def vals(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "val"}


def assert_close(a: dict, b: dict, steps) -> None:
    worst = max(abs(a[s] - b[s]) for s in steps)
    assert worst < TOL, f"max |Δloss| = {worst:.2e} over steps {list(steps)[0]}..{list(steps)[-1]}"


@pytest.fixture(scope="module")
def reference(tiny_cfg, built_run, tmp_path_factory) -> Path:
    """The single-process run every parallel run is compared with."""
    run = tmp_path_factory.mktemp("ref") / "run"
    run.mkdir()
    shutil.copy(built_run / "tokenizer.json", run / "tokenizer.json")
    shutil.copytree(built_run / "data", run / "data")
    Trainer(single_cfg(tiny_cfg), run).run()
    return run


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_match_one_process(parallel, reference, fresh_run):
    torchrun(fresh_run, f"train.parallel={parallel}")
    got, want = losses(fresh_run), losses(reference)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert_close(got, want, range(1, STEPS + 1))
    assert_close(vals(fresh_run), vals(reference), [0, 10, 20])
    ckpts = list_checkpoints(fresh_run)
    assert [p.name for p in ckpts] == ["step_0000010", "step_0000020"]
    assert all(is_sharded(p) and (p / "COMPLETE").is_file() for p in ckpts)
    assert {"rng_rank0.pt", "rng_rank1.pt"} <= {p.name for p in ckpts[-1].iterdir()}
    events = [r for r in read_metrics(fresh_run / "metrics.jsonl") if r["kind"] == "event"]
    assert events[0]["event"] == "start" and events[0]["world_size"] == 2  # written once, by rank 0


def test_fsdp_checkpoint_resumes_in_one_process(tiny_cfg, reference, fresh_run):
    """2 → 1: the FSDP run's step-10 checkpoint, resumed by a single process, continues the curve."""
    torchrun(fresh_run, "train.parallel=fsdp")
    shutil.rmtree(fresh_run / "checkpoints" / "step_0000020")
    (fresh_run / "checkpoints" / ".tmp_step_0000020").mkdir()  # a partial save must be ignored
    summary = Trainer(single_cfg(tiny_cfg), fresh_run, resume=True).run()
    assert summary["step"] == STEPS
    assert_close(losses(fresh_run), losses(reference), range(1, STEPS + 1))
    last = list_checkpoints(fresh_run)[-1]
    assert last.name == "step_0000020" and (last / "model.safetensors").is_file()  # single-file again


def test_single_process_checkpoint_resumes_on_two_ranks(reference, fresh_run):
    """1 → 2: the reference's step-10 single-file checkpoint, resumed by 2 FSDP ranks."""
    shutil.rmtree(fresh_run)
    shutil.copytree(reference, fresh_run)
    shutil.rmtree(fresh_run / "checkpoints" / "step_0000020")
    torchrun(fresh_run, "train.parallel=fsdp", resume=True)
    assert_close(losses(fresh_run), losses(reference), range(1, STEPS + 1))
    assert is_sharded(list_checkpoints(fresh_run)[-1])


def test_export_weights_from_sharded_checkpoint(reference, fresh_run, tmp_path):
    from safetensors.torch import load_file

    from spud.export import export_weights

    torchrun(fresh_run, "train.parallel=ddp")
    out = export_weights(fresh_run, out=tmp_path / "model.safetensors")
    ref = export_weights(reference, out=tmp_path / "ref.safetensors")
    a, b = load_file(out), load_file(ref)
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)
    assert (tmp_path / "config.yaml").is_file()
