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


from spud.config import Config, save_config, validate_config
from spud.errors import SpudError
from spud.model.registry import build_model
from spud.model.transformer import Transformer
from spud.runs import choose_model, default_serving_model
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


def load_source(run_dir: str | Path, which: Which = "auto", checkpoint: str | int | None = None) -> Source:
    """Read one complete checkpoint (single-file or sharded DCP) of RUN's base or chat model into
    a CPU fp32 model. auto = the chat model when SFT made one, as `spud serve` picks."""
    run = Path(run_dir)
    kind = default_serving_model(run) if which == "auto" else which
    try:
        choice = choose_model(run, kind, checkpoint)  # the same resolution and errors as serve/eval
    except SpudError:
        if which != "auto" or kind != "base":
            raise
        try:  # RUN may itself be a chat run directory (RUN/chat given directly)
            choice, kind = choose_model(run, "chat", checkpoint), "chat"
        except SpudError:
            choice = None
        if choice is None:
            raise
    ckpt = choice.checkpoint
    state = ckpt_io.read_state(ckpt)
    cfg = validate_config(state["config"], f"{ckpt}/state.json")
    tok_path = next((d / "tokenizer.json" for d in (choice.run, run) if (d / "tokenizer.json").is_file()), None)
    if tok_path is None:
        raise SpudError(f"{choice.run}/tokenizer.json is missing; the export needs the run's tokenizer")
    tok = Tokenizer.load(tok_path)
    want = state.get("tokenizer_sha256")
    if want and want != tok.sha256():
        raise SpudError(f"{tok_path} is not the tokenizer {ckpt} was trained with (sha256 differs)")
    model = build_model(cfg.model)
    if ckpt_io.is_sharded(ckpt):
        ckpt_io.load_sharded(ckpt, model)
    else:
        ckpt_io.load_weights(ckpt, model, "cpu")
    return Source(run, choice.run, kind, ckpt, state, cfg, model.float().eval(), tok, tok_path)


def write_weights_run(run: Path, model: Transformer, cfg: Config, tok: Tokenizer, **meta: Any) -> Path:
    """Make `run` a run directory holding `model` as one weights-only checkpoint (step 0), with
    its tokenizer and config: what `spud import hf` writes, and all that serve, eval and the
    exports need. `meta` joins the checkpoint's state.json. → the checkpoint."""
    tok.save(run / "tokenizer.json")
    save_config(cfg, run / "config.yaml")
    state = {"tokens_seen": 0, "loader": None, "config": cfg.model_dump(mode="json"),
             "tokenizer_sha256": tok.sha256(), "val": None, "weights_only": True, **meta}
    return ckpt_io.save_checkpoint(run, 0, model, None, state, None, keep=1)


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
