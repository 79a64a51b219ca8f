"""Muon under data parallelism (gloo, CPU), launched as users launch it (torchrun -m spud train):
one process and 2 ranks (DDP, FSDP2) give the same loss curve, and a sharded checkpoint with Muon
momentum resumes at a different number of ranks (2 → 1, 1 → 2) as if nothing had happened.
Same harness and tolerance as test_dist_equivalence.py (the AdamW version)."""

import shutil
from pathlib import Path

import pytest
import torch

from spud.train.checkpoint import is_sharded, list_checkpoints
from spud.train.trainer import Trainer

from test_dist_equivalence import STEPS, assert_close, losses, single_cfg, torchrun, vals

MUON = ["train.optimizer=muon", "train.muon_momentum_warmup_steps=15"]


def muon_single(tiny_cfg):
    cfg = single_cfg(tiny_cfg)
    cfg.train.optimizer, cfg.train.muon_momentum_warmup_steps = "muon", 15
    return cfg


@pytest.fixture(scope="module")
def muon_reference(tiny_cfg, built_run, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("muon_ref") / "run"
    run.mkdir()
    shutil.copy(built_run / "tokenizer.json", run / "tokenizer.json")
    shutil.copytree(built_run / "data", run / "data")
    Trainer(muon_single(tiny_cfg), run).run()
    return run


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_match_one_process_with_muon(parallel, tiny_cfg, muon_reference, fresh_run):
    torchrun(fresh_run, f"train.parallel={parallel}", *MUON)
    want = losses(muon_reference)
    assert_close(losses(fresh_run), want, range(1, STEPS + 1))
    assert_close(vals(fresh_run), vals(muon_reference), [0, 10, 20])
    if parallel == "fsdp":  # 2 → 1: the sharded step-10 checkpoint (with momentum) in one process
        step10 = list_checkpoints(fresh_run)[0]
        assert is_sharded(step10)
        shutil.rmtree(fresh_run / "checkpoints" / "step_0000020")
        Trainer(muon_single(tiny_cfg), fresh_run, resume=True).run()
        assert_close(losses(fresh_run), want, range(1, STEPS + 1))
        state = torch.load(list_checkpoints(fresh_run)[-1] / "optimizer.pt", weights_only=True)
        assert sum("momentum_buffer" in s for s in state["state"].values()) == 4 * tiny_cfg.model.n_layers


def test_single_process_muon_checkpoint_resumes_on_two_fsdp_ranks(muon_reference, fresh_run):
    """1 → 2: the reference's single-file step-10 checkpoint, resumed by 2 FSDP ranks."""
    shutil.rmtree(fresh_run)
    shutil.copytree(muon_reference, fresh_run)
    shutil.rmtree(fresh_run / "checkpoints" / "step_0000020")
    torchrun(fresh_run, "train.parallel=fsdp", *MUON, resume=True)
    assert_close(losses(fresh_run), losses(muon_reference), range(1, STEPS + 1))
    assert is_sharded(list_checkpoints(fresh_run)[-1])
