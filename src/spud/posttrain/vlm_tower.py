"""Stage 0 of `spud vlm` (RUN/vlm/tower/): teach a fresh vision tower to see before a language
model has to learn to read it.

The tower (encoder + projector, spud.model.vision.VisionTower) is trained alone on the built-in
training pictures with direct read-outs: one linear head per question type over the tower's
flattened output tokens, predicting that type's answer token by token as the tokenizer writes it
("47" is the tokens 4, 7; "light gray" two tokens) — the same answers the SFT stage teaches, no
other labels. The tower that comes out replaces the random one the SFT (or align) stage would
start from; the heads are thrown away.

Why a stage of its own: in `spud vlm` a fresh tower learns only through the language model's
attention, a read-out that itself starts from nothing, and each picture costs its whole
conversation's language-model tokens. Measured at demo scale (docs/vision.md, "Measured"):
600 SFT steps from a random tower read 1 % of held-out numbers; the same 600 steps from a tower
given this stage first (70 s) read 69.5 %. It is what a pretrained encoder gives LLaVA, made from
the built-in pictures; with a pretrained `hf` encoder only the projector learns here unless
vlm.align_encoder says otherwise.

The stage is deterministic (seeded pictures, batches and initialisation) and takes a minute or
two, so it keeps no mid-stage checkpoint: an interrupted stage restarts, and a finished one is
reused when its settings (tower.json's fingerprint) are unchanged.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import resource
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from spud.config import Config
from spud.data import images as builtin_images
from spud.errors import SpudError
from spud.model.vision import VisionTower, load_image
from spud.runtime import pick_device, set_threads
from spud.tokenizer import Tokenizer

WEIGHTS_FILE = "tower.safetensors"
SUMMARY_FILE = "tower.json"
WARMUP_STEPS = 10
CHECKS = 4  # validation accuracy this many times over the stage
# The training pictures are converted to tensors once when they fit in this many bytes (the
# default 20,000 pictures of 32² take 246 MB): converting each step's pictures again took ~15 %
# of a step, on one core while the others waited (benchmarks/vlm_tower_step.py).
PIXEL_CACHE_BYTES = 512 * 2**20


class AnswerTargets:
    """Each picture's answers as class ids, per question type: (N, L) tensors where position j
    holds the answer's j-th token as a class among the tokens the training answers of that type
    use at any position, then one 'end' class, then -100 (ignored). A validation answer with a
    token no training answer has, or longer than every training answer, gets class -1 there:
    ignored by the loss, counted wrong."""

    def __init__(self, samples, tok: Tokenizer, like: AnswerTargets | None = None) -> None:
        answers: dict[str, list[list[int] | None]] = {}
        for i, s in enumerate(samples):
            for qtype, _, answer in s.qa:
                col = answers.setdefault(qtype, [None] * len(samples))
                if col[i] is None:
                    col[i] = tok.encode(answer)
        if like is None:  # the training pictures: their answers define the classes and lengths
            self.classes = {t: sorted({t_ for ids in col if ids for t_ in ids}) for t, col in answers.items()}
            self.length = {t: 1 + max((len(ids) for ids in col if ids), default=0) for t, col in answers.items()}
        else:  # validation pictures are read by the training heads
            self.classes, self.length = like.classes, like.length
        classes = self.classes
        self.targets: dict[str, torch.Tensor] = {}
        for t, vocab in classes.items():
            index = {tid: c for c, tid in enumerate(vocab)}
            y = torch.full((len(samples), self.length[t]), -100, dtype=torch.long)
            for i, ids in enumerate(answers.get(t, [None] * len(samples))):
                if ids is None:
                    continue
                row = [index.get(tid, -1) for tid in ids] + [len(vocab)]
                if len(row) > self.length[t]:  # longer than any training answer: cannot be read
                    row = row[: self.length[t] - 1] + [-1]
                y[i, : len(row)] = torch.tensor(row)
            self.targets[t] = y


class AnswerHeads(nn.Module):
    """One linear read-out per question type: the tower's tokens, flattened → length × classes."""

    def __init__(self, in_dim: int, targets: AnswerTargets) -> None:
        super().__init__()
        self.shape = {t: (targets.length[t], len(v) + 1) for t, v in targets.classes.items()}
        self.heads = nn.ModuleDict({t: nn.Linear(in_dim, n * c) for t, (n, c) in self.shape.items()})

    def forward(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        return {t: head(z).view(len(z), *self.shape[t]) for t, head in self.heads.items()}


class AttentionHeads(nn.Module):
    """Read-outs shaped like the language model's: per question type and answer position a learnt
    query attends over the tower's tokens (keys and values shared by all read-outs, 4 heads), and
    a small MLP maps what it read to that position's classes. The tower must then put what a
    picture shows where one attention read can get it: the way the language model will read it."""

    def __init__(self, d_model: int, targets: AnswerTargets, n_heads: int = 4) -> None:
        super().__init__()
        self.shape = {t: (targets.length[t], len(v) + 1) for t, v in targets.classes.items()}
        self.n_heads = n_heads
        self.norm = nn.LayerNorm(d_model)
        self.kv = nn.Linear(d_model, 2 * d_model)
        self.queries = nn.ParameterDict({t: nn.Parameter(torch.randn(n, d_model) * d_model ** -0.5)
                                         for t, (n, _) in self.shape.items()})
        self.out = nn.ModuleDict({t: nn.Sequential(nn.Linear(d_model, 2 * d_model), nn.GELU(),
                                                   nn.Linear(2 * d_model, c)) for t, (_, c) in self.shape.items()})

    def forward(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        b, n, d = tokens.shape
        k, v = (x.view(b, n, self.n_heads, -1).transpose(1, 2) for x in self.kv(self.norm(tokens)).chunk(2, -1))
        logits = {}
        for t, q in self.queries.items():
            q = q.view(1, len(q), self.n_heads, -1).transpose(1, 2).expand(b, -1, -1, -1)
            read = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, d)
            logits[t] = self.out[t](read)
        return logits


def _loss(logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
    total = logits[next(iter(logits))].new_zeros(())
    for t, out in logits.items():
        y = targets[t].clamp(min=-100)
        y = torch.where(y == -1, torch.full_like(y, -100), y)
        if (y != -100).any():
            total = total + F.cross_entropy(out.flatten(0, 1), y.flatten(), ignore_index=-100)
    return total


def _exact(logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> dict[str, float]:
    """Exact-match share per question type over the pictures asked that type."""
    out = {}
    for t, lg in logits.items():
        y = targets[t]
        asked = (y != -100).any(1)
        if asked.any():
            ok = ((lg.argmax(-1) == y) | (y == -100)).all(1)
            out[t] = round(float(ok[asked].float().mean()), 4)
    return out


def fingerprint(cfg: Config) -> str:
    """What decides the stage's result: change any of it and the stage runs again."""
    v = cfg.vlm
    key = {"steps": v.tower_steps, "lr": v.tower_lr, "batch": v.tower_batch_size, "readout": v.tower_readout, "images": v.builtin_images,
           "kinds": list(v.builtin_kinds), "seed": cfg.seed, "d_model": cfg.model.d_model,
           "vision": cfg.model.vision.model_dump(mode="json"), "align_encoder": v.align_encoder,
           "base": v.base_checkpoint}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _tokenizer(cfg: Config) -> Tokenizer:
    return Tokenizer.load(Path(cfg.vlm.base_checkpoint).parent.parent / "tokenizer.json")


def _pixels(samples, cfg: Config) -> torch.Tensor:
    return torch.stack([load_image(s.image, cfg.model.vision) for s in samples])


def train_tower(cfg: Config, out_dir: Path, console) -> dict:
    """Run (or reuse) the tower stage; → its summary, with `weights` the file the next stage
    starts its tower from, or `interrupted`."""
    v, vision = cfg.vlm, cfg.model.vision
    out_dir = Path(out_dir)
    summary_path, weights_path = out_dir / SUMMARY_FILE, out_dir / WEIGHTS_FILE
    key = fingerprint(cfg)
    if summary_path.is_file() and weights_path.is_file():
        try:
            done = json.loads(summary_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            done = {}
        if done.get("fingerprint") == key:
            console.print(f"vlm tower: reusing {weights_path} (same settings)")
            return {**done, "weights": str(weights_path), "reused": True}
    threads = set_threads(cfg.train.threads)
    device = pick_device(cfg.train.device)
    size, kinds = vision.image_size, tuple(v.builtin_kinds)
    t0 = time.time()
    train = builtin_images.generate(v.builtin_images, cfg.seed, held_out=False, size=size, kinds=kinds)
    # Validation pictures are the SFT stage's (training split, another seed): never the eval's.
    val = builtin_images.generate(max(v.val_images, 64), cfg.seed + 1, held_out=False, size=size, kinds=kinds)
    tok = _tokenizer(cfg)
    y_train = AnswerTargets(train, tok)
    y_val = AnswerTargets(val, tok, like=y_train)
    x_val = _pixels(val, cfg).to(device)
    x_train = _pixels(train, cfg) if len(train) * 3 * size * size * 4 <= PIXEL_CACHE_BYTES else None
    gen_s = time.time() - t0

    torch.manual_seed(cfg.seed)
    tower = VisionTower(cfg.model).to(device)
    if v.tower_readout == "attention":
        heads = AttentionHeads(cfg.model.d_model, y_train).to(device)
        read = tower
    else:
        heads = AnswerHeads(vision.tokens_per_image * cfg.model.d_model, y_train).to(device)
        read = lambda x: tower(x).flatten(1)  # noqa: E731
    train_encoder = v.align_encoder if v.align_encoder is not None else vision.encoder == "vit"
    for name, p in tower.named_parameters():
        p.requires_grad = train_encoder or not name.startswith("encoder.")
    params = [p for p in tower.parameters() if p.requires_grad] + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=v.tower_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    metrics = []
    console.print(f"vlm tower: {v.tower_steps} steps of {v.tower_batch_size} pictures "
                  f"({len(train):,} training pictures, {sum(y_train.length.values())} answer positions "
                  f"in {len(y_train.classes)} question types) · {threads} threads · {device}")
    c0, t1, step, first_loss = resource.getrusage(resource.RUSAGE_SELF), time.time(), 0, None
    try:
        for step in range(1, v.tower_steps + 1):
            warm = min(1.0, step / WARMUP_STEPS)
            cosine = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / v.tower_steps))
            for group in opt.param_groups:
                group["lr"] = v.tower_lr * warm * cosine
            idx = torch.randint(0, len(train), (v.tower_batch_size,), generator=gen)
            x = (x_train[idx] if x_train is not None else _pixels([train[i] for i in idx.tolist()], cfg)).to(device)
            loss = _loss(heads(read(x)), {t: y[idx].to(device) for t, y in y_train.targets.items()})
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            if step == 1:
                first_loss = round(loss.item(), 4)
            if step % max(1, v.tower_steps // CHECKS) == 0 or step == v.tower_steps:
                with torch.no_grad():
                    acc = _exact(heads(read(x_val)), {t: y.to(device) for t, y in y_val.targets.items()})
                metrics.append({"step": step, "loss": round(loss.item(), 4), "val_exact": acc})
                console.print(f"vlm tower step {step}: loss {loss.item():.3f} · validation exact "
                              + " ".join(f"{t} {a:.0%}" for t, a in sorted(acc.items())))
    except KeyboardInterrupt:
        console.print(f"[yellow]vlm tower: interrupted at step {step}; nothing saved — the stage is "
                      "deterministic and restarts with --resume")
        return {"interrupted": True, "step": step}
    c1 = resource.getrusage(resource.RUSAGE_SELF)
    summary = {"fingerprint": key, "steps": v.tower_steps, "batch_size": v.tower_batch_size, "lr": v.tower_lr,
               "train_pictures": len(train), "val_pictures": len(val), "trained_encoder": train_encoder,
               "classes": {t: len(c) for t, c in y_train.classes.items()}, "first_loss": first_loss,
               "metrics": metrics,
               "val_exact": metrics[-1]["val_exact"] if metrics else {}, "wall_s": round(time.time() - t1, 1),
               "picture_s": round(gen_s, 1), "threads": threads,
               "cpu_s": round(c1.ru_utime - c0.ru_utime + c1.ru_stime - c0.ru_stime, 1)}
    if rank0:  # every rank trains the same tower; one writes it (atomically: a crash leaves none)
        out_dir.mkdir(parents=True, exist_ok=True)
        state = {k: t.detach().cpu().contiguous() for k, t in tower.state_dict().items()}
        save_file(state, str(weights_path) + ".tmp")
        os.replace(str(weights_path) + ".tmp", weights_path)
        tmp = summary_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(summary, indent=2), encoding="utf-8")
        os.replace(tmp, summary_path)
    return {**summary, "weights": str(weights_path), "state": tower.state_dict()}


def load_tower(model: nn.Module, tower: dict | str | Path) -> None:
    """Put the stage's tower into a VLM (`model.vision`), from its state dict or its file."""
    state = tower if isinstance(tower, dict) else load_file(str(tower))
    try:
        model.vision.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise SpudError(f"the tower stage's weights do not fit this model's vision tower ({e}); "
                        f"delete {WEIGHTS_FILE} to retrain it") from None
