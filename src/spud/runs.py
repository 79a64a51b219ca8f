"""Reading a run directory back: its resolved config, tokenizer and a model from a checkpoint.

Every consumer of a finished run (sample, serve, chat, eval, export) goes through here, so they
all agree on what "the latest checkpoint" is, which model (base or chat) they load, and refuse
mismatched weights the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from spud.config import Config, validate_config
from spud.errors import SpudError
from spud.model.registry import build_model
from spud.model_kinds import MODEL_DIRS, MODELS
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


CHAT_DIR = MODEL_DIRS["chat"]  # where `spud sft RUN` puts the chat model by default


@dataclass(frozen=True)
class ModelChoice:
    """Which model and which checkpoint a command uses, resolved before any weights are read,
    so it can be printed, recorded in results and checked against the prompts it is given."""

    model: str  # a key of MODEL_DIRS
    run: Path  # the directory whose checkpoints/ hold it (RUN, or RUN/chat, ...)
    checkpoint: Path
    step: int | None

    def describe(self) -> str:
        return f"{self.model} model, checkpoint {self.checkpoint}"


def _model_kind(cfg: Config) -> str:
    """What a checkpoint *is*, from its own config: each post-training stage records the checkpoint
    it started from (an RL model started from a chat model keeps the sft section too)."""
    if cfg.vlm.base_checkpoint:  # the last stage a checkpoint went through names it
        return "vlm"  # (spud vlm starts from a text model, so it is always the last)
    if cfg.dpo.base_checkpoint:
        return "dpo"
    if cfg.rl.base_checkpoint:
        return "rl"
    return "chat" if cfg.sft.base_checkpoint else "base"


def has_model(run_dir: str | Path, model: str) -> bool:
    """Whether RUN has a complete checkpoint of `model` (e.g. has it been through `spud sft`)."""
    _check_model_name(model)
    return ckpt_io.latest_checkpoint(Path(run_dir) / MODEL_DIRS[model]) is not None


def default_serving_model(run_dir: str | Path) -> str:
    """serve/chat talk to people: the chat model when RUN has one, else what RUN itself holds
    (a chat run directory given directly, e.g. `spud sft --out runs/demo-chat`, is chat)."""
    if has_model(run_dir, "chat"):
        return "chat"
    own = ckpt_io.latest_checkpoint(Path(run_dir))
    return _model_kind(_state_config(own)) if own is not None else "base"


def _check_model_name(model: str) -> None:
    if model not in MODEL_DIRS:
        raise SpudError(f"unknown model {model!r}: choose one of {', '.join(MODELS)}")


def choose_model(run_dir: str | Path, model: str = "base", checkpoint: str | int | None = None) -> ModelChoice:
    """Resolve `model` of RUN to a checkpoint, refusing a directory that holds another kind.

    `checkpoint` names one of the chosen model's own checkpoints (default: its latest). A chat
    run directory given directly (`spud eval RUN/chat --model chat`) is accepted as itself."""
    _check_model_name(model)
    run = Path(run_dir)
    if not run.is_dir():
        raise SpudError(f"run directory not found: {run}")
    where = run / MODEL_DIRS[model]
    if model != "base" and ckpt_io.latest_checkpoint(where) is None:
        here = ckpt_io.latest_checkpoint(run)
        if here is not None and _model_kind(_state_config(here)) == model:
            where = run  # RUN itself is the chat run directory
        else:
            how = {"chat": f"; make one with: spud sft {run}",
                   "rl": f"; make one with: spud rl {run}",
                   "dpo": f"; make one with: spud dpo {run}",
                   "vlm": f"; make one with: spud vlm {run}"}.get(model, "")
            raise SpudError(f"{run} has no {model} model ({where} holds no complete checkpoint){how}")
    ckpt = ckpt_io.resolve_checkpoint(where, checkpoint)
    state = ckpt_io.read_state(ckpt)
    kind = _model_kind(validate_config(state["config"], f"{ckpt}/state.json"))
    if kind != model:
        raise SpudError(f"{ckpt} holds a {kind} model, not the {model} model asked for; "
                        f"choose it with --model {kind}")
    step = state.get("step")
    return ModelChoice(model, where, ckpt, int(step) if isinstance(step, int) else None)


def _state_config(ckpt: Path) -> Config:
    return validate_config(ckpt_io.read_state(ckpt)["config"], f"{ckpt}/state.json")


def load_choice(choice: ModelChoice, device: str = "auto"):
    """→ (model in eval mode, tokenizer, config) for an already resolved choice."""
    cfg = _state_config(choice.checkpoint)
    tok = Tokenizer.load(choice.run / "tokenizer.json")
    dev = pick_device(device)
    model = build_model(cfg.model)
    ckpt_io.load_weights(choice.checkpoint, model, "cpu")
    model.to(dev).eval()
    return model, tok, cfg


def load_model(run_dir: str | Path, checkpoint: str | int | None = None, device: str = "auto",
               model: str = "base"):
    """→ (model in eval mode, tokenizer, config, checkpoint path) of RUN's `model` ("base": the
    pretrained model in RUN; "chat": the `spud sft` model in RUN/chat). There is no silent
    preference: every caller says which model it wants (serve/chat pick with
    default_serving_model and print the choice)."""
    choice = choose_model(run_dir, model, checkpoint)
    net, tok, cfg = load_choice(choice, device)
    return net, tok, cfg, choice.checkpoint
