"""`train.init_from`: start a fresh pretraining run from existing weights (continued pretraining).

The source is a run directory (its latest checkpoint) or one checkpoint directory, e.g. a model
brought in with `spud import hf`. Only the weights are taken: optimizer, data order and step
start fresh, on the data of the new run's config, tokenized with the source run's tokenizer
(copied into the new run before its data is built, so ids mean the same thing). The model config
must equal the source's; a difference is an error naming each field.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from spud.config import Config, validate_config
from spud.errors import SpudError
from spud.tokenizer import Tokenizer
from spud.train import checkpoint as ckpt_io


def resolve(path: str) -> tuple[Path, Path]:
    """→ (checkpoint directory, the run directory holding it and its tokenizer)."""
    p = Path(path)
    if (p / "state.json").is_file():
        return p, p.parent.parent
    if p.is_dir():
        return ckpt_io.resolve_checkpoint(p, None), p
    raise SpudError(f"train.init_from: {p} is neither a run directory nor a checkpoint directory")


def copy_tokenizer(cfg: Config, run_dir: Path) -> None:
    """Give the new run the source run's tokenizer (before its data is tokenized)."""
    if not cfg.train.init_from or (run_dir / "tokenizer.json").is_file():
        return
    _, src_run = resolve(cfg.train.init_from)
    if not (src_run / "tokenizer.json").is_file():
        raise SpudError(f"train.init_from: {src_run}/tokenizer.json is missing")
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (src_run / name).is_file():
            shutil.copyfile(src_run / name, run_dir / name)


def load(cfg: Config, model: torch.nn.Module, tokenizer: Tokenizer) -> Path:
    """Copy the source checkpoint's weights into `model` after checking config and tokenizer."""
    ckpt, _ = resolve(cfg.train.init_from)
    state = ckpt_io.read_state(ckpt)
    saved = validate_config(state["config"], f"{ckpt}/state.json").model
    diff = ckpt_io.config_diff(saved.model_dump(mode="json"), cfg.model.model_dump(mode="json"))
    if diff:
        raise SpudError(f"train.init_from={ckpt}: its model config differs from this run's:\n  "
                        + "\n  ".join(diff) + "\nCopy the `model:` section of its config.yaml.")
    want = state.get("tokenizer_sha256")
    if want and want != tokenizer.sha256():
        raise SpudError(f"train.init_from={ckpt} was trained with another tokenizer than this run's "
                        f"tokenizer.json; start the run in a new --out directory so it copies the right one")
    if ckpt_io.is_sharded(ckpt):
        ckpt_io.load_sharded(ckpt, model)
    else:
        ckpt_io.load_weights(ckpt, model, "cpu")
    return ckpt
