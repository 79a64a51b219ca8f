"""Reading a run directory back: its resolved config, tokenizer and a model from a checkpoint.

Every consumer of a finished run (sample, later serve/eval/export) goes through here, so they
all agree on what "the latest checkpoint" is and refuse mismatched weights the same way.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from spud.config import Config, validate_config
from spud.errors import SpudError
from spud.model.registry import build_model
from spud.runtime import pick_device
from spud.tokenizer import Tokenizer
from spud.train import checkpoint as ckpt_io


def load_run_config(run_dir: str | Path) -> Config:
    run = Path(run_dir)
    path = run / "config.yaml"
    if not run.is_dir():
        raise SpudError(f"run directory not found: {run}")
    if not path.is_file():
        raise SpudError(f"{run} has no config.yaml; is it a spud run directory?")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise SpudError(f"{path}: not valid YAML: {e}") from None
    return validate_config(tree, str(path))


CHAT_DIR = "chat"  # where `spud sft RUN` puts the chat model by default


def load_model(run_dir: str | Path, checkpoint: str | int | None = None, device: str = "auto",
               prefer_chat: bool = True):
    """→ (model in eval mode, tokenizer, config, checkpoint path).

    With prefer_chat and no explicit checkpoint, a run that has been fine-tuned into a chat model
    (RUN/chat/ holds a complete checkpoint) loads that one: `spud serve RUN` and `spud chat RUN`
    then talk to the chat model without the user having to know where SFT put it. An explicit
    checkpoint always names one of RUN's own checkpoints."""
    run = Path(run_dir)
    if prefer_chat and checkpoint in (None, "latest") and ckpt_io.latest_checkpoint(run / CHAT_DIR) is not None:
        run = run / CHAT_DIR
    ckpt = ckpt_io.resolve_checkpoint(run, checkpoint)
    cfg = validate_config(ckpt_io.read_state(ckpt)["config"], f"{ckpt}/state.json")
    tok = Tokenizer.load(run / "tokenizer.json")
    dev = pick_device(device)
    model = build_model(cfg.model)
    ckpt_io.load_weights(ckpt, model, "cpu")
    model.to(dev).eval()
    return model, tok, cfg, ckpt

