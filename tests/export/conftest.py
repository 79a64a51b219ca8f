"""Run directories for export tests, made in about a second each: a small BPE tokenizer trained on
the built-in chat data and a tiny model whose weights are random but *not* at their init values
(norm gains and all matrices perturbed), so a mis-mapped tensor cannot hide behind ones or
symmetric values. `trained_run` is a real training run for the tests that need one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from spud.config import TokenizerConfig, validate_config
from spud.model.registry import build_model
from spud.posttrain import builtin_chat
from spud.tokenizer import train_tokenizer
from spud.train import checkpoint as ckpt_io

os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

BASE = {"d_model": 64, "n_layers": 2, "n_heads": 4, "max_seq_len": 128}


@pytest.fixture(scope="session")
def chat_tokenizer(tmp_path_factory):
    texts = [m["content"] for c in builtin_chat.conversations(400, 0) for m in c]
    tok = train_tokenizer(iter(texts), TokenizerConfig(vocab_size=400))
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(path)
    return path


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.2 * noise if p.dim() == 1 else 0.1 * noise)


def make_run(run: Path, tok_path: Path, step: int = 5, chat: bool = False, seed: int = 0, **model_kw) -> Path:
    """RUN with tokenizer.json, config.yaml and one checkpoint (and RUN/chat/ with another if chat)."""
    from spud.tokenizer import Tokenizer

    tok = Tokenizer.load(tok_path)
    run.mkdir(parents=True)
    tok.save(run / "tokenizer.json")
    cfg = validate_config({"model": {**BASE, "vocab_size": 448, **model_kw}})
    model = build_model(cfg.model)
    randomize(model, seed)
    state = {"tokens_seen": 1000 * step, "loader": {}, "config": cfg.model_dump(mode="json"),
             "tokenizer_sha256": tok.sha256(), "val": None}
    ckpt_io.save_checkpoint(run, step, model, None, state, None, keep=3)
    (run / "config.yaml").write_text(cfg.to_yaml())
    if chat:
        chat_dir = run / "chat"
        chat_dir.mkdir()
        tok.save(chat_dir / "tokenizer.json")
        randomize(model, seed + 1)
        ccfg = validate_config({**cfg.model_dump(mode="json"),
                                "sft": {"base_run": str(run), "data": ["builtin"],
                                        "base_checkpoint": str(ckpt_io.latest_checkpoint(run))}})
        cstate = {**state, "tokens_seen": 500, "config": ccfg.model_dump(mode="json")}
        ckpt_io.save_checkpoint(chat_dir, 3, model, None, cstate, None, keep=3)
        (chat_dir / "config.yaml").write_text(ccfg.to_yaml())
    return run


@pytest.fixture
def run_factory(chat_tokenizer, tmp_path):
    counter = iter(range(1000))

    def factory(**kw) -> Path:
        return make_run(tmp_path / f"run{next(counter)}", chat_tokenizer, **kw)

    return factory


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """A run of configs/tiny.yaml trained for a few steps: real manifest, real checkpoint."""
    from rich.console import Console

    from spud.config import load_config
    from spud.train.trainer import Trainer
    from tiny_recipe import TINY_OVERRIDES

    cfg = load_config(Path(__file__).parents[2] / "configs" / "tiny.yaml",
                      [*TINY_OVERRIDES, "train.max_steps=8", "train.sample_prompts=[]", "model.max_seq_len=128",
                       "train.seq_len=32"])
    run = tmp_path_factory.mktemp("trained") / "tiny-run"
    Trainer(cfg, run, console=Console(quiet=True)).run()
    return run
