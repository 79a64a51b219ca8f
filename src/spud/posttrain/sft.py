"""`spud sft`: supervised fine-tuning of a pretrained run into a chat model.

The pretraining `Trainer` runs SFT unchanged through its hooks: the data is packed chat
conversations instead of token shards, the weights start from the base run's checkpoint, and the
schedule comes from the config's `sft:` section (copied into `train` of the chat run). Checkpoints,
exact resume, Ctrl-C handling and metrics are therefore the pretraining ones; exact resume only
needs the loader position to be exact, which it is: an epoch's packing is a pure function of
(seed, epoch), so the position is two integers.

The chat model is a run directory of its own, by default RUN/chat/, which `spud.runs.load_model`
prefers for `spud serve RUN` / `spud chat RUN`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
import yaml

from spud.config import Config, _merge, parse_overrides, validate_config
from spud.errors import SpudError
from spud.posttrain.chat_data import (
    ChatSource,
    Conversation,
    epoch_conversations,
    load_chat_data,
)
from spud.serve.sampling import generate
from spud.tokenizer import Tokenizer
from spud.train import checkpoint as ckpt_io
from spud.train.trainer import Trainer

SUMMARY_FILE = "sft_data.json"


def pack(convs: list[Conversation], window: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy packing in the given order: whole conversations (each opening with <|bos|>) are
    appended to a window of `window` tokens until the next one does not fit; the rest of the
    window is padding that is never a target. → (tokens, trained) arrays of shape (N, window)."""
    rows_ids, rows_mask = [], []
    cur_ids: list[int] = []
    cur_mask: list[int] = []
    for c in convs:
        if len(c.ids) > window:  # load_source already enforces this; a guard, not a code path
            raise SpudError(f"{c.where}: {len(c.ids)} tokens do not fit a {window}-token window")
        if len(cur_ids) + len(c.ids) > window:
            rows_ids.append(cur_ids)
            rows_mask.append(cur_mask)
            cur_ids, cur_mask = [], []
        cur_ids.extend(c.ids)
        cur_mask.extend(c.mask)
    if cur_ids:
        rows_ids.append(cur_ids)
        rows_mask.append(cur_mask)
    tokens = np.full((len(rows_ids), window), pad_id, dtype=np.int64)
    trained = np.zeros((len(rows_ids), window), dtype=bool)
    for i, (ids, mask) in enumerate(zip(rows_ids, rows_mask)):
        tokens[i, :len(ids)] = ids
        trained[i, :len(mask)] = np.asarray(mask, dtype=bool)
    return tokens, trained


def to_xy(tokens: np.ndarray, trained: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """x = window[:-1]; y = window[1:], with -1 where the target is not an assistant token."""
    x = torch.from_numpy(tokens[:, :-1].copy())
    y = torch.from_numpy(np.where(trained[:, 1:], tokens[:, 1:], -1))
    return x, y


class PackedChatLoader:
    """(x, y) batches of packed conversations. Train: each epoch re-draws the weighted mix and its
    order from (seed, epoch) and packs it; val: all held-out conversations in a fixed order. When
    an epoch has fewer windows than a batch, the batch wraps around its windows (tiny data sets
    still train), so every epoch has at least one batch."""

    def __init__(self, sources: list[ChatSource] | None, val: list[Conversation] | None,
                 batch_size: int, seq_len: int, seed: int, pad_id: int, rank: int = 0, world_size: int = 1):
        self.sources, self.val = sources, val
        self.batch_size, self.window, self.seed, self.pad_id = batch_size, seq_len + 1, seed, pad_id
        # data parallel: a global batch is world_size consecutive micro-batches; rank r takes the
        # r-th, so ranks never share a window (as in the pretraining TokenLoader)
        self.rank, self.global_batch = rank, batch_size * world_size
        self.epoch, self.batch = 0, 0
        self._cached: tuple[int, np.ndarray, np.ndarray] | None = None
        self.windows_per_epoch = len(self._epoch(0)[0])

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if self._cached is None or self._cached[0] != epoch:
            convs = self.val if self.val is not None else epoch_conversations(self.sources, self.seed, epoch)
            self._cached = (epoch, *pack(convs, self.window, self.pad_id))
        return self._cached[1], self._cached[2]

    def _next_rows(self) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """This rank's packed rows for the next step (the epoch's arrays and the row indices),
        advancing the position; subclasses that carry more per row (images) index with them."""
        tokens, trained = self._epoch(self.epoch)
        n = len(tokens)
        per_epoch = max(1, n // self.global_batch)
        first = self.batch * self.global_batch + self.rank * self.batch_size
        idx = [(first + j) % n for j in range(self.batch_size)]
        self.batch += 1
        if self.batch >= per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
        return tokens, trained, idx

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, trained, idx = self._next_rows()
        return to_xy(tokens[idx], trained[idx])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])


class SFTTrainer(Trainer):
    """The pretraining loop on chat data, starting from the base run's weights."""

    def prepare_data(self, cfg: Config) -> Tokenizer:
        s = cfg.sft
        if not s.base_run or not s.base_checkpoint:
            raise SpudError("sft.base_run and sft.base_checkpoint must be set (use spud sft RUN)")
        base = Path(s.base_run)
        # The chat run carries a byte-identical copy, so it is a complete run directory on its own.
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if (base / name).is_file():
                shutil.copyfile(base / name, self.run_dir / name)
        tok = Tokenizer.load(self.run_dir / "tokenizer.json")
        want = ckpt_io.read_state(Path(s.base_checkpoint)).get("tokenizer_sha256")
        if want and want != tok.sha256():
            raise SpudError(f"{base}/tokenizer.json is not the tokenizer {s.base_checkpoint} was trained with")
        self.chat_sources = load_chat_data(s.data, tok, cfg.seq_len + 1, s.val_fraction, s.max_bad_fraction,
                                           s.builtin_conversations, cfg.seed, s.tool_share)
        self.chat_val = [c for src in self.chat_sources for c in src.val]
        summary = {"sources": [src.summary for src in self.chat_sources],
                   "train_conversations": sum(len(src.train) for src in self.chat_sources),
                   "val_conversations": len(self.chat_val),
                   "bad": sum(src.summary["bad"] for src in self.chat_sources),
                   "truncated": sum(src.summary["truncated"] for src in self.chat_sources),
                   "tool_conversations": sum(src.summary["tool_conversations"] for src in self.chat_sources),
                   "tool_conversations_too_long": sum(src.summary["tool_conversations_too_long"]
                                                      for src in self.chat_sources)}
        (self.run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
        self.data_summary = summary
        return tok

    def make_loader(self, split: str):
        t = self.cfg.train
        dist = {"rank": getattr(self, "rank", 0), "world_size": getattr(self, "world", 1)}
        if split == "train":
            return PackedChatLoader(self.chat_sources, None, t.micro_batch_size, self.seq_len,
                                    self.cfg.seed, self.tokenizer.pad_id, **dist)
        return PackedChatLoader(None, self.chat_val, t.micro_batch_size, self.seq_len,
                                self.cfg.seed, self.tokenizer.pad_id, **dist)

    def val_available(self) -> bool:
        return bool(self.chat_val)

    def init_weights(self, model: torch.nn.Module) -> None:
        """Never a random init: SFT continues the pretrained weights."""
        ckpt_io.load_weights(Path(self.cfg.sft.base_checkpoint), model, "cpu")

    def sample(self) -> list[dict]:
        """Greedy answers to `sft.sample_prompts` as single user turns, in the chat format."""
        out = []
        for prompt in self.cfg.sft.sample_prompts:
            ids, _ = self.tokenizer.render_chat([{"role": "user", "content": prompt}], add_generation_prompt=True)
            new = list(generate(self.model, ids, self.cfg.train.sample_tokens, temperature=0.0,
                                stop_ids=[self.tokenizer.end_id, self.tokenizer.bos_id]))
            out.append({"prompt": prompt, "text": self.tokenizer.decode(new)})
        return out


def sft_config(run: str | Path, data: list[str] | None, out: str | Path, overrides: list[str],
               resume: bool) -> Config:
    """The chat run's config: the base checkpoint's config, the `sft:` section (saved one when
    resuming, then overrides, then --data), and `train` derived from `sft`."""
    run_dir, out = Path(run), Path(out)
    saved = out / "config.yaml"
    saved_tree, saved_sft = None, None
    if resume and saved.is_file():
        saved_tree = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
        saved_sft = saved_tree.get("sft")
    if saved_sft and saved_sft.get("base_checkpoint"):
        # a resumed run keeps the base it started from, even if the base run has trained on since
        base_ckpt = Path(saved_sft["base_checkpoint"])
    else:
        base_ckpt = ckpt_io.resolve_checkpoint(run_dir, None)
    tree = ckpt_io.read_state(base_ckpt)["config"]
    if saved_sft:
        # a run saved before sft.tool_share existed trained without tool data: it resumes so
        saved_sft.setdefault("tool_share", 0.0)
        tree["sft"] = saved_sft
    if overrides:
        tree = _merge(tree, parse_overrides(overrides), "")
    base_train = validate_config(tree, f"{base_ckpt}/state.json").train  # before train is replaced
    if saved_sft:
        # resuming: the run's own seed (its data and order), model settings (dropout) and train
        # settings (threads, parallel), as the uninterrupted run had them; the LRs are derived
        # from the base's below, as at the start
        tree = {**tree, **{k: saved_tree[k] for k in ("seed", "model", "train") if k in saved_tree}}
        if overrides:
            tree = _merge(tree, parse_overrides(overrides), "")
    tree.setdefault("sft", {})
    if data:
        tree["sft"]["data"] = list(data)
    elif not tree["sft"].get("data"):
        tree["sft"]["data"] = ["builtin"]
    tree["sft"]["base_run"] = str(run_dir.resolve())
    tree["sft"]["base_checkpoint"] = str(base_ckpt.resolve())
    cfg = validate_config(tree, f"spud sft {run}")
    s = cfg.sft
    # Every optimizer group moves by the same share of its pretraining LR: with Muon the matrices'
    # LR (muon_lr) is a separate number, and so are an untied embedding's and head's; fine-tuning
    # at any of pretraining's full LRs would undo the base model rather than adapt it.
    ratio = s.lr / base_train.lr if s.lr else s.lr_ratio
    train = cfg.train.model_copy(update={
        "max_steps": s.max_steps, **base_train.scaled_lrs(ratio),
        "warmup_steps": s.warmup_steps,
        "min_lr_ratio": s.min_lr_ratio, "schedule": s.schedule, "micro_batch_size": s.micro_batch_size,
        "tokens_per_step": None, "weight_decay": s.weight_decay, "eval_every": s.eval_every,
        "eval_batches": s.eval_batches, "checkpoint_every": s.checkpoint_every, "sample_every": 0,
        "sample_prompts": list(s.sample_prompts), "log_every": 1})
    return validate_config({**cfg.model_dump(mode="json"), "train": train.model_dump(mode="json")},
                           f"spud sft {run}")


def sft_cmd(run: str, data: list[str] | None, out: str | None, overrides: list[str], resume: bool,
            console=None) -> dict:
    """`spud sft RUN --data chats.jsonl[:weight] ... [--out DIR] [key=value ...] [--resume]`.
    → the Trainer's summary plus `out` and the data summary."""
    out_dir = Path(out) if out else Path(run) / "chat"
    cfg = sft_config(run, data, out_dir, overrides or [], resume)
    trainer = SFTTrainer(cfg, out_dir, resume=resume, console=console)
    too_long = trainer.data_summary["tool_conversations_too_long"]
    skipped = f"; {too_long:,} skipped: longer than the context" if too_long else ""
    trainer.console.print(
        f"sft: {trainer.data_summary['train_conversations']:,} train / "
        f"{trainer.data_summary['val_conversations']:,} val conversations "
        f"({trainer.data_summary['tool_conversations']:,} with tools{skipped}), "
        f"{trainer.data_summary['bad']} bad, {trainer.data_summary['truncated']} truncated "
        f"(details: {out_dir / SUMMARY_FILE}) · from {cfg.sft.base_checkpoint}")
    summary = trainer.run()
    return {**summary, "out": str(out_dir), "data": trainer.data_summary,
            "base_checkpoint": cfg.sft.base_checkpoint}
