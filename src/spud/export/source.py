"""What an export reads (one checkpoint of a run, base or chat) and how it writes (all or nothing).

Shared by `export hf`, `export gguf` and `import hf`, so every verb refuses the same bad inputs
with the same words and none of them ever leaves a half-written output behind.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from spud.config import Config, validate_config
from spud.errors import SpudError
from spud.model.registry import build_model
from spud.model.transformer import Transformer
from spud.runs import CHAT_DIR
from spud.tokenizer import Tokenizer
from spud.train import checkpoint as ckpt_io

Which = Literal["auto", "base", "chat"]


@dataclass
class Source:
    run: Path  # the run the user named
    model_dir: Path  # run itself (base) or run/chat (chat)
    kind: Literal["base", "chat"]
    checkpoint: Path
    state: dict[str, Any]
    cfg: Config
    model: Transformer
    tokenizer: Tokenizer
    tokenizer_path: Path


def resolve_model_dir(run: Path, which: Which) -> tuple[Path, Literal["base", "chat"]]:
    """auto: the chat model when SFT made one (as `spud serve` does), else the base model."""
    if not run.is_dir():
        raise SpudError(f"run directory not found: {run}")
    chat = run / CHAT_DIR
    has_chat = ckpt_io.latest_checkpoint(chat) is not None
    if which == "chat" and not has_chat:
        raise SpudError(f"--chat: {run} has no chat model ({chat} holds no complete checkpoint); "
                        f"fine-tune one first with `spud sft {run}`, or export the base model with --base")
    if which == "chat" or (which == "auto" and has_chat):
        return chat, "chat"
    return run, "base"


def load_source(run_dir: str | Path, which: Which = "auto", checkpoint: str | int | None = None) -> Source:
    """Read one complete checkpoint (single-file or sharded DCP) into a CPU fp32 model."""
    run = Path(run_dir)
    model_dir, kind = resolve_model_dir(run, which)
    if ckpt_io.latest_checkpoint(model_dir) is None:
        raise SpudError(f"{model_dir} has no complete checkpoint (a checkpoint is complete once "
                        f"training has saved it: state.json + weights); train first with "
                        f"`spud train CONFIG --out {run}`")
    ckpt = ckpt_io.resolve_checkpoint(model_dir, checkpoint)
    state = ckpt_io.read_state(ckpt)
    cfg = validate_config(state["config"], f"{ckpt}/state.json")
    tok_path = next((d / "tokenizer.json" for d in (model_dir, run) if (d / "tokenizer.json").is_file()), None)
    if tok_path is None:
        raise SpudError(f"{model_dir}/tokenizer.json is missing; the export needs the run's tokenizer")
    tok = Tokenizer.load(tok_path)
    want = state.get("tokenizer_sha256")
    if want and want != tok.sha256():
        raise SpudError(f"{tok_path} is not the tokenizer {ckpt} was trained with (sha256 differs)")
    model = build_model(cfg.model)
    if ckpt_io.is_sharded(ckpt):
        ckpt_io.load_sharded(ckpt, model)
    else:
        ckpt_io.load_weights(ckpt, model, "cpu")
    return Source(run, model_dir, kind, ckpt, state, cfg, model.float().eval(), tok, tok_path)


def spud_state(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's tensors by Spud name (tied head included under both names)."""
    return {k: v for k, v in model.state_dict(keep_vars=False).items()}


@contextmanager
def staged_output(out: str | Path, force: bool, is_dir: bool = True) -> Iterator[Path]:
    """Yield a fresh temp path next to `out`; on success it replaces `out` (rename), on any
    failure it is deleted. An existing non-empty `out` is refused unless `force`."""
    out = Path(out)
    if out.exists():
        if is_dir and not out.is_dir():
            raise SpudError(f"{out} exists and is a file; give a directory path for the export")
        if not is_dir and out.is_dir():
            raise SpudError(f"{out} is a directory; give a file path such as {out / 'model.gguf'}")
        if (out.is_file() or any(out.iterdir())) and not force:
            raise SpudError(f"{out} already exists and is not empty; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    if is_dir:
        tmp.mkdir()
    try:
        yield tmp
        if out.is_dir():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)  # rename away first: `out` is never half-deleted
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
        raise
