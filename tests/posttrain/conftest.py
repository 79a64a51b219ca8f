"""A pretrained-looking base run made in a second: a small BPE tokenizer, a tiny model with its
random init saved as the run's checkpoint. SFT only needs a run directory with a tokenizer and a
checkpoint; how the weights were trained does not matter to what these tests check."""

import os
from pathlib import Path

import pytest

from spud.config import TokenizerConfig, validate_config
from spud.model.registry import build_model
from spud.posttrain import builtin_chat
from spud.runtime import seed_everything
from spud.tokenizer import train_tokenizer
from spud.train import checkpoint as ckpt_io

os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

BASE_MODEL = {"d_model": 32, "n_layers": 1, "n_heads": 2, "max_seq_len": 160}

from sft_helpers import SFT_OVERRIDES  # noqa: F401  (re-exported for the tests)


def make_base_run(run: Path, step: int = 7) -> Path:
    run.mkdir(parents=True)
    texts = [m["content"] for c in builtin_chat.conversations(400, 0) for m in c]
    tok = train_tokenizer(iter(texts), TokenizerConfig(vocab_size=400))
    tok.save(run / "tokenizer.json")
    cfg = validate_config({"model": {**BASE_MODEL, "vocab_size": 448}, "train": {"lr": 0.002}})
    seed_everything(5)
    model = build_model(cfg.model)
    state = {"tokens_seen": 0, "loader": {}, "config": cfg.model_dump(mode="json"),
             "tokenizer_sha256": tok.sha256(), "val": None}
    ckpt_io.save_checkpoint(run, step, model, None, state, None, keep=3)
    (run / "config.yaml").write_text(cfg.to_yaml())
    return run


@pytest.fixture(scope="session")
def base_template(tmp_path_factory) -> Path:
    return make_base_run(tmp_path_factory.mktemp("base") / "run")


@pytest.fixture
def base_run(base_template, tmp_path) -> Path:
    import shutil

    run = tmp_path / "base"
    shutil.copytree(base_template, run)
    return run
