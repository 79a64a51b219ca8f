"""Pretraining loop: data → model → AdamW steps, with validation, samples and checkpoints.

Resume is bit-exact: a checkpoint holds weights, optimizer state, the loader position and every
RNG state as of the end of a completed step, and the LR is a pure function of the step. Ctrl-C
(or SIGTERM, e.g. a Slurm preemption) sets a flag that the loop checks between steps, so the
checkpoint it writes is never of a half-applied optimizer update; a second Ctrl-C aborts at once.

Under torchrun (train.parallel=ddp|fsdp, see distributed.py) every rank runs this loop on its
slice of the global batch; rank 0 alone logs and prints. A step whose loss or gradient norm is not
finite is skipped (no update); `train.max_bad_steps` in a row roll back to the last checkpoint.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from spud.config import Config, save_config
from spud.data.build import build_dataset
from spud.data.loader import TokenLoader
from spud.errors import SpudError
from spud.model.flops import flops_per_token, param_counts
from spud.model.registry import build_model
from spud.hardware import peak_flops
from spud.runtime import (
    autocast,
    compute_dtype,
    pick_device,
    rng_state,
    seed_everything,
    set_rng_state,
    set_threads,
)
from spud.tokenizer import Tokenizer
from spud.train import checkpoint as ckpt_io
from spud.train import distributed, faults, init_from
from spud.train.faults import graceful_stop
from spud.train.metrics import MetricsLog, read_metrics, truncate_after
from spud.train.optim import apply_schedule, build_optimizer, check_resumable
from spud.train.schedule import lr_at
from spud.train.trainer_eval import TrainerEval
from spud.ui import make_console


def resolve_vocab(cfg: Config, tok: Tokenizer) -> Config:
    """Fill model.vocab_size from the tokenizer, padded to a multiple of 64 (matmul-friendly)."""
    if cfg.model.vocab_size is None:
        cfg = cfg.model_copy(deep=True)
        cfg.model.vocab_size = (tok.vocab_size + 63) // 64 * 64
    elif cfg.model.vocab_size < tok.vocab_size:
        raise SpudError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
            f"{tok.vocab_size} tokens; remove model.vocab_size to take it from the tokenizer"
        )
    return cfg


class Trainer(TrainerEval):
    def __init__(self, cfg: Config, run_dir: str | Path, resume: bool = False, console: Console | None = None):
        self.run_dir = Path(run_dir)
        self.dist = distributed.detect(cfg.train)
        self.rank, self.world = self.dist.rank, self.dist.world_size
        self.console = console or make_console()
        if not self.dist.is_main:
            self.console.quiet = True
        self.threads = set_threads(distributed.default_threads(self.dist, cfg.train.threads))
        self.device = distributed.init(self.dist, pick_device(cfg.train.device))
        if self.dist.note:
            self.console.print(f"[yellow]{self.dist.note}")
        self.run_dir.mkdir(parents=True, exist_ok=True)

        if self.dist.is_main:  # build data/tokenizer once; the other ranks then read the result
            self.tokenizer = self.prepare_data(cfg)
        distributed.barrier(self.dist)
        if not self.dist.is_main:
            self.tokenizer = self.prepare_data(cfg)
        self.cfg = cfg = resolve_vocab(cfg, self.tokenizer)
        # A damaged newest checkpoint is skipped with a warning naming the file (fall back).
        self.resume_from = ckpt_io.latest_checkpoint(
            self.run_dir, training=True,
            warn=lambda m: self.console.print(f"warning: {m}", style="yellow", markup=False, highlight=False),
        ) if resume else None
        if not resume and ckpt_io.list_checkpoints(self.run_dir):
            raise SpudError(
                f"{self.run_dir} already has checkpoints; pass --resume to continue that run, "
                "or choose a new --out directory"
            )
        if resume and self.resume_from is None:
            self.console.print(f"[yellow]--resume: no checkpoint in {self.run_dir}, starting fresh")
        if self.resume_from is not None:
            saved = ckpt_io.read_state(self.resume_from)["config"]["model"]
            diff = ckpt_io.config_diff(saved, cfg.model.model_dump(mode="json"))
            if diff:
                raise SpudError(
                    f"checkpoint {self.resume_from} was trained with a different model config:\n  "
                    + "\n  ".join(diff)
                    + "\nUse the same model settings to resume, or a new --out directory."
                )
            saved_cfg = ckpt_io.read_state(self.resume_from)["config"]
            changes = ckpt_io.config_diff(saved_cfg, cfg.model_dump(mode="json"), "", ("was", "now"))
            if changes:  # e.g. a longer train.max_steps: allowed, but never silently
                self.console.print(f"resuming with a config that differs from {self.resume_from.name}'s:\n  "
                                   + "\n  ".join(changes), style="yellow", markup=False, highlight=False)
        if self.dist.is_main:
            save_config(cfg, self.run_dir / "config.yaml")

        t = cfg.train
        self.seq_len = cfg.seq_len
        if self.seq_len > cfg.model.max_seq_len:
            raise SpudError(f"train.seq_len={self.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}")
        self.memory_line, refusal = distributed.memory_plan(cfg, self.dist, self.device,
                                                            t.micro_batch_size, self.seq_len)
        if refusal:
            raise SpudError(refusal)

        seed_everything(cfg.seed)  # same on every rank: identical initial weights
        self.model = build_model(cfg.model)
        if self.resume_from is None:
            self.init_weights(self.model)
        self.set_trainable(self.model)  # before the optimizer: frozen weights get no state
        self.model.to(self.device)
        if t.activation_checkpointing:
            distributed.apply_activation_checkpointing(self.model)
        self.train_module = distributed.wrap(self.model, self.dist, self.device, t.mixed_precision)
        self.step_model = torch.compile(self.train_module) if cfg.train.compile else self.train_module
        self.optimizer = build_optimizer(self.model, cfg.train, self.device, self.dist.parallel)
        if self.resume_from is not None:
            check_resumable(ckpt_io.read_state(self.resume_from)["config"], cfg.train, str(self.resume_from))
        if self.world > 1:  # distinct dropout masks per rank
            torch.manual_seed(cfg.seed + 7919 * self.rank)

        micro_tokens = t.micro_batch_size * self.seq_len * self.world
        self.accum = max(1, round((t.tokens_per_step or micro_tokens) / micro_tokens))
        self.tokens_per_step = self.accum * micro_tokens
        self.train_loader = self.make_loader("train")
        self.token_bytes = torch.tensor(self.tokenizer.byte_lengths(cfg.model.vocab_size),
                                        dtype=torch.float64, device=self.device)
        self.has_val = self.val_available()
        if self.has_val:  # fail now, not at the first eval, if val is too small for one batch
            self.make_loader("val")
        else:
            self.console.print("[yellow]data.val_fraction=0: no validation split, no val loss/bpb")

        counts = param_counts(cfg.model)
        self.flops_per_token = flops_per_token(cfg.model, self.seq_len)["training"]
        self.peak = peak_flops(self.device, compute_dtype(self.device))
        self.facts = {
            "params": counts["total"],
            "non_embedding_params": counts["non_embedding"],
            "flops_per_token": self.flops_per_token,
            "tokens_per_step": self.tokens_per_step,
            "grad_accum": self.accum,
            "device": str(self.device),
            "threads": self.threads,
            "peak_flops": self.peak,
        }
        if self.dist.enabled:
            self.facts.update(parallel=self.dist.parallel, world_size=self.world)
        self.step = 0
        self.tokens_seen = 0
        self.val_history: list[dict] = []
        self.lr_scale = 1.0  # multiplied by train.rollback_lr_factor at each rollback
        self.bad_steps = 0
        self._poison = set(t.debug_nan_at_step)  # testing aid: steps whose loss becomes NaN

    # ------------------------------------------------ hooks (post-training overrides these)
    def prepare_data(self, cfg: Config) -> Tokenizer:
        """Make sure the run has its token shards (building data and tokenizer if needed)."""
        init_from.copy_tokenizer(cfg, self.run_dir)  # train.init_from: tokenize with its tokenizer
        self.manifest = build_dataset(cfg, self.run_dir, progress=True, log=self.console.print)
        return Tokenizer.load(self.run_dir / "tokenizer.json")

    def make_loader(self, split: str):
        """A loader with next_batch() -> (x, y), state_dict(), load_state_dict(), windows_per_epoch."""
        t = self.cfg.train
        return TokenLoader(self.run_dir, split, t.micro_batch_size, self.seq_len, self.cfg.seed,
                           rank=self.rank, world_size=self.world)

    def val_available(self) -> bool:
        return self.manifest["val_tokens"] > 0

    def set_trainable(self, model: torch.nn.Module) -> None:
        """Which weights this run trains (all of them; spud vlm's align stage freezes the
        language model). Called on every start, resumed or not, before the optimizer is built."""

    def batch_inputs(self, batch: tuple) -> dict:
        """Model inputs a batch carries beside (x, y), as forward() keywords: none for token
        batches; spud vlm's batches add the images of their <|image|> positions."""
        return {}

    def init_weights(self, model: torch.nn.Module) -> None:
        """Weights of a fresh run (not a resume): the model's own random init for pretraining, or
        those of train.init_from (continued pretraining, e.g. of a `spud import hf` model)."""
        if self.cfg.train.init_from:
            ckpt = init_from.load(self.cfg, model, self.tokenizer)
            self.console.print(f"starting from the weights of {ckpt} (train.init_from)")

    # --------------------------------------------------------------------------- checkpoints
    def _snapshot(self) -> dict:
        """Loader position and RNG as of the end of the last completed step."""
        return {"loader": self.train_loader.state_dict(), "rng": rng_state(), "tokens": self.tokens_seen,
                "lr_scale": self.lr_scale}

    def save(self, snap: dict) -> Path:
        state = {
            "tokens_seen": snap["tokens"],
            "loader": snap["loader"],
            "config": self.cfg.model_dump(mode="json"),
            "tokenizer_sha256": self.tokenizer.sha256(),
            "val": self.val_history[-1] if self.val_history else None,
        }
        if snap["lr_scale"] != 1.0:
            state["lr_scale"] = snap["lr_scale"]
        if self.dist.enabled:
            state.update(parallel=self.dist.parallel, world_size=self.world)
            return ckpt_io.save_sharded(self.run_dir, self.step, self.model, self.optimizer, state,
                                        snap["rng"], self.cfg.train.keep_checkpoints, self.rank)
        return ckpt_io.save_checkpoint(self.run_dir, self.step, self.model, self.optimizer, state,
                                       snap["rng"], self.cfg.train.keep_checkpoints)

    def _load_model_and_optimizer(self, ckpt: Path) -> dict | None:
        """Weights + optimizer from either format at the current world size; returns RNG state."""
        if ckpt_io.is_sharded(ckpt):  # DCP: any number of ranks, including a single process
            ckpt_io.load_sharded(ckpt, self.model, self.optimizer)
            return ckpt_io.load_rng(ckpt, self.rank)
        if self.dist.enabled:  # single-file checkpoint into ranks (1 → N)
            ckpt_io.load_full_into_sharded(ckpt, self.model, self.optimizer)
            return ckpt_io.load_rng(ckpt, self.rank)
        ckpt_io.load_weights(ckpt, self.model, self.device)
        return ckpt_io.load_training_state(ckpt, self.optimizer)

    def _restore(self, log: MetricsLog) -> None:
        ckpt = self.resume_from
        state = ckpt_io.read_state(ckpt)
        rng = self._load_model_and_optimizer(ckpt)
        self.train_loader.load_state_dict(state["loader"])
        if rng is not None:
            set_rng_state(rng)
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.lr_scale = state.get("lr_scale", 1.0)
        if self.step >= self.cfg.train.max_steps:
            self.console.print(f"[yellow]{ckpt.name} is at step {self.step} >= train.max_steps; nothing to do")

    # ---------------------------------------------------------------------------------- loop
    def train_step(self, lr: float) -> tuple[float, float]:
        """One optimizer step; (global mean loss, global grad norm). A non-finite loss or norm
        skips the update (self.bad_steps counts such steps in a row)."""
        apply_schedule(self.optimizer, lr, self.step, self.cfg.train)  # every group's LR, Muon momentum
        loss_sum = 0.0
        poison = self.step + 1 in self._poison
        for i in range(self.accum):
            batch = self.train_loader.next_batch()
            x, y = (v.to(self.device, non_blocking=True) for v in batch[:2])
            extra = self.batch_inputs(batch)
            with distributed.sync_context(self.dist, self.step_model, self.model, i == self.accum - 1):
                with autocast(self.device):
                    loss = self.step_model(x, y, **extra)
                if poison:
                    loss = loss * float("nan")
                (loss / self.accum).backward()
            loss_sum += loss.detach().float().item()
        self._poison.discard(self.step + 1)
        loss = distributed.mean(self.dist, loss_sum / self.accum, self.device)
        self.aux_metrics = self._aux_metrics()
        clip = self.cfg.train.grad_clip or float("inf")
        grad_norm = distributed.clip_grad_norm(self.dist, self.model, clip)
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.optimizer.step()
            self.bad_steps = 0
        else:
            self.bad_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        return loss, grad_norm

    def _rollback(self, log) -> None:
        faults.rollback(self, log)

    def run(self) -> dict:
        if not self.dist.enabled:
            return self._run()
        try:
            return self._run()
        except RuntimeError as e:  # gloo/nccl errors, including collective timeouts
            raise distributed.collective_error(self.dist, e) from e
        finally:
            distributed.shutdown(self.dist)

    def _run(self) -> dict:
        t = self.cfg.train
        metrics_path = self.run_dir / "metrics.jsonl"
        main = self.dist.is_main
        if self.resume_from is not None and main:
            truncate_after(metrics_path, ckpt_io.read_state(self.resume_from)["step"])
        log = MetricsLog(metrics_path) if main else faults.NoLog()
        if self.resume_from is not None:
            self._restore(log)
            log.write("event", self.step, event="resume", checkpoint=self.resume_from.name)
            self.console.print(f"resuming from step {self.step} ({self.resume_from})")
        else:
            log.write("event", 0, event="start", **self.facts)
        self.console.print(
            f"model {self.facts['params'] / 1e6:.2f}M params · {self.tokens_per_step} tokens/step "
            f"(micro-batch {t.micro_batch_size}×{self.seq_len}, accum {self.accum}) · {self.device} "
            f"· {self.threads} threads"
            + (f" · {self.dist.parallel} × {self.world} ranks" if self.dist.enabled else "")
        )
        self.console.print(self.memory_line)
        if self.step == 0 and (first := self.evaluate()) is not None:
            self.val_history.append({"step": 0, **first})
            log.write("val", 0, **first)
        snap = self._snapshot()
        start_wall, interrupted = time.time(), False
        columns = [TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn()]
        with graceful_stop() as flag, Progress(*columns, console=self.console, transient=False,
                                               disable=not main) as bar:
            task = bar.add_task("train", total=t.max_steps, completed=self.step, info="")
            while self.step < t.max_steps:
                if distributed.any_true(self.dist, flag["stop"], self.device):
                    interrupted = True
                    break
                t0 = time.perf_counter()
                lr = lr_at(self.step, t) * self.lr_scale
                loss, gnorm = self.train_step(lr)
                if self.bad_steps:
                    log.write("event", self.step + 1, event="nonfinite", loss=str(loss), grad_norm=str(gnorm),
                              consecutive=self.bad_steps)
                    if self.bad_steps >= t.max_bad_steps:
                        self._rollback(log)
                        snap = self._snapshot()
                        continue
                dt = time.perf_counter() - t0
                self.step += 1
                self.tokens_seen += self.tokens_per_step
                tps = self.tokens_per_step / dt
                mfu = self._mfu(tps)
                if self.step % t.log_every == 0 or self.step == t.max_steps:
                    log.write("train", self.step, loss=loss, lr=lr, grad_norm=gnorm, tokens=self.tokens_seen,
                              tokens_per_s=tps, mfu=mfu, step_time=dt, **self.aux_metrics)
                info = f"loss {loss:.3f} · {tps:,.0f} tok/s · MFU {mfu:.0%}"
                is_eval_step = self.step % t.eval_every == 0 or self.step == t.max_steps
                if is_eval_step and (val := self.evaluate()) is not None:
                    self.val_history.append({"step": self.step, **val})
                    log.write("val", self.step, **val)
                    bar.console.print(f"step {self.step}: val loss {val['loss']:.4f} · bpb {val['bpb']:.4f}")
                if (t.sample_every and self.step % t.sample_every == 0) or self.step == t.max_steps:
                    for s in self.sample():
                        log.write("sample", self.step, **s)
                bar.update(task, completed=self.step, info=info)
                snap = self._snapshot()
                if self.step % t.checkpoint_every == 0 or self.step == t.max_steps:
                    self.save(snap)
        if interrupted:
            path = self.save(snap)
            log.write("event", self.step, event="interrupt", checkpoint=path.name)
            self.console.print(f"[yellow]interrupted: saved {path}; continue with --resume")
        log.write("event", self.step, event="end", wall_s=time.time() - start_wall)
        log.close()
        records = read_metrics(metrics_path)  # the whole run's history, across resumes
        return {
            "run_dir": str(self.run_dir),
            "rank": self.rank,
            "step": self.step,
            "interrupted": interrupted,
            "val": [r for r in records if r["kind"] == "val"],
            "samples": [r for r in records if r["kind"] == "sample"],
            "wall_s": time.time() - start_wall,
            **self.facts,
        }
