"""All architecture options together under DDP and FSDP2 (2 gloo ranks, torchrun as users launch
it): the loss curve equals the single-process one for the same global batch, and the logged
per-expert token counts are global (summed over ranks and micro-batches)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from spud.train.metrics import read_metrics
from spud.train.trainer import Trainer

ROOT = Path(__file__).parents[2]
STEPS, PER_RANK, SEQ = 6, 2, 32
TOKENS_PER_STEP = 2 * 2 * PER_RANK * SEQ  # 2 ranks × accumulation 2
# The MoE balancing loss is left at weight 0 here: it is a product of per-micro-batch averages,
# so its value depends on how the global batch is split (it is still computed and logged).
OPTIONS = ["model.zero_init_residual=true", "model.x0_mix=true", "model.value_embeds=1",
           "model.unet_skips=true", "model.attn_pattern=LG", "model.attn_window=8",
           "model.moe_experts=3", "model.moe_top_k=2", "model.mlp_hidden=32", "model.moe_aux_loss=0",
           "model.mtp_depth=1"]
TRAIN = [f"train.max_steps={STEPS}", f"train.checkpoint_every={STEPS}", f"train.eval_every={STEPS}",
         f"train.tokens_per_step={TOKENS_PER_STEP}", "train.sample_tokens=4"]


def train_records(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"}


@pytest.fixture(scope="module")
def reference(built_run, tmp_path_factory) -> Path:
    from spud.config import load_config

    from tiny_recipe import TINY_OVERRIDES

    cfg = load_config(ROOT / "configs" / "tiny.yaml",
                      [*TINY_OVERRIDES, *OPTIONS, *TRAIN, f"train.micro_batch_size={2 * PER_RANK}"])
    run = tmp_path_factory.mktemp("opts-ref") / "run"
    run.mkdir()
    shutil.copy(built_run / "tokenizer.json", run / "tokenizer.json")
    shutil.copytree(built_run / "data", run / "data")
    Trainer(cfg, run).run()
    return run


# FSDP only, to keep the suite fast: it is the demanding case (sharded experts, heads and
# root-level option weights); DDP passes the same test (["ddp", "fsdp"] to run both).
@pytest.mark.parametrize("parallel", ["fsdp"])
def test_options_on_two_ranks_match_one_process(parallel, reference, built_run, tmp_path):
    from tiny_recipe import TINY_OVERRIDES

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(built_run / "tokenizer.json", run / "tokenizer.json")
    shutil.copytree(built_run / "data", run / "data")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "spud", "train", str(ROOT / "configs" / "tiny.yaml"), *TINY_OVERRIDES, *OPTIONS, *TRAIN,
           f"train.micro_batch_size={PER_RANK}", "train.dist_timeout_s=60",
           f"train.parallel={parallel}", "--out", str(run)]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    got, want = train_records(run), train_records(reference)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in got:
        for key in ("loss", "lm_loss", "mtp_loss"):
            assert abs(got[step][key] - want[step][key]) < 1e-5, (step, key)
        assert got[step]["expert_tokens"] == want[step]["expert_tokens"]
        main_layers = got[step]["expert_tokens"][:2]  # then the MTP head's MoE layer
        assert all(sum(row) == TOKENS_PER_STEP * 2 for row in main_layers)
