"""A tiny run with a chat model, made in a second: a small BPE tokenizer (trained on the built-in
chat data and the picture questions), a random tiny model saved as the base checkpoint and again
as RUN/chat's. `spud vlm` only needs a chat checkpoint and its tokenizer; how the weights were
trained does not matter to what these tests check."""

import os
import shutil
from pathlib import Path

import pytest

from spud.config import TokenizerConfig, validate_config
from spud.data import images
from spud.model.registry import build_model
from spud.posttrain import builtin_chat
from spud.runtime import seed_everything
from spud.tokenizer import train_tokenizer
from spud.train import checkpoint as ckpt_io

os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

from vision_helpers import FONTS, MODEL, VLM_OVERRIDES  # noqa: E402,F401  (shared with the tests)


def make_chat_run(run: Path) -> Path:
    run.mkdir(parents=True)
    texts = [m["content"] for c in builtin_chat.conversations(300, 0) for m in c]
    texts += [s.caption + " " + " ".join(q + " " + a for _, q, a in s.qa)
              for s in images.generate(120, 0, size=16, fonts=FONTS)]
    tok = train_tokenizer(iter(texts), TokenizerConfig(vocab_size=400))
    tok.save(run / "tokenizer.json")
    cfg = validate_config({"model": {**MODEL, "vocab_size": 448}, "train": {"lr": 0.002}})
    seed_everything(5)
    model = build_model(cfg.model)
    state = {"tokens_seen": 0, "loader": {}, "config": cfg.model_dump(mode="json"),
             "tokenizer_sha256": tok.sha256(), "val": None}
    ckpt_io.save_checkpoint(run, 7, model, None, state, None, keep=3)
    (run / "config.yaml").write_text(cfg.to_yaml())
    chat = run / "chat"
    chat.mkdir()
    shutil.copy(run / "tokenizer.json", chat / "tokenizer.json")
    tree = cfg.model_dump(mode="json")
    tree["sft"].update(base_run=str(run), base_checkpoint=str(run / "checkpoints" / "step_0000007"),
                       data=["builtin"])
    chat_cfg = validate_config(tree)
    ckpt_io.save_checkpoint(chat, 5, model, None, {**state, "config": chat_cfg.model_dump(mode="json")},
                            None, keep=3)
    (chat / "config.yaml").write_text(chat_cfg.to_yaml())
    return run


@pytest.fixture(scope="session")
def chat_template_run(tmp_path_factory) -> Path:
    return make_chat_run(tmp_path_factory.mktemp("vision") / "run")


@pytest.fixture
def chat_run(chat_template_run, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(chat_template_run, run)
    return run
