"""`spud vlm RUN`: give a run's chat model eyes — a vision tower, then up to three training stages.

The LLaVA recipe at demo scale (nanoVLM is the small-scale reference), after a stage 0:
0. tower (RUN/vlm/tower/, spud.posttrain.vlm_tower): the fresh tower alone learns the built-in
   pictures' answers through linear read-outs, so the language model starts from a tower that
   sees (the part a pretrained encoder plays in LLaVA).
1. align (RUN/vlm/align/): the chat model gets a vision encoder and a projector
   (spud.model.vision.add_vision) and the run's tokenizer an <|image|> token; the language model
   is frozen and the vision tower learns to produce embeddings the language model can caption
   from. The from-scratch ViT trains here too; a pretrained (hf) encoder stays frozen unless
   vlm.align_encoder says otherwise.
2. multimodal SFT (RUN/vlm/): the whole model trains on question–answer conversations about
   pictures, mixed with the text SFT data (vlm.text_data, vlm.text_weight) so that the text skills
   the chat model had are rehearsed rather than overwritten.

Both stages are the pretraining `Trainer` with its hooks (data, weights, which weights train,
images in the batch), so checkpoints, exact resume, Ctrl-C, metrics and validation are the ones
every other stage has, and RUN/vlm/ is a run directory in the one checkpoint format that `spud
serve RUN --model vlm`, `spud eval RUN --model vlm` and `spud chat` load like any other.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import yaml

from spud.config import Config, _merge, parse_overrides, validate_config
from spud.errors import SpudError
from spud.model.registry import build_model
from spud.posttrain import vlm_data
from spud.posttrain.chat_data import load_chat_data
from spud.runs import choose_model
from spud.tokenizer import Tokenizer
from spud.train import checkpoint as ckpt_io
from spud.train.trainer import Trainer

SUMMARY_FILE = "vlm_data.json"
STAGES = ("align", "sft")


class VLMTrainer(Trainer):
    """One vision stage (cfg.train holds the stage's schedule; `stage` says which)."""

    def __init__(self, cfg: Config, run_dir, stage: str, init_checkpoint: Path, tower=None, **kw):
        self.stage, self.init_checkpoint = stage, Path(init_checkpoint)
        self.tower = tower  # the tower stage's weights (state dict or file) for a fresh tower
        super().__init__(cfg, run_dir, **kw)
        if stage == "sft":
            self._vision_lr_groups(cfg.vlm.vision_lr / self.cfg.train.lr)

    def _vision_lr_groups(self, ratio: float) -> None:
        """The new vision tower learns at vlm.vision_lr, the pretrained language model at vlm.lr
        (nanoVLM's split: a fresh projector needs a far larger step than weights that already
        work). Each optimizer group is split in two before the first step (and before a resumed
        run loads its optimizer state, so the layout matches the saved one)."""
        vision = {id(p) for n, p in self.model.named_parameters() if n.startswith("vision.")}
        for group in list(self.optimizer.param_groups):
            mine = [p for p in group["params"] if id(p) in vision]
            if not mine:
                continue
            rest = [p for p in group["params"] if id(p) not in vision]
            settings = {k: v for k, v in group.items() if k != "params"}
            settings["lr_ratio"] = group.get("lr_ratio", 1.0) * ratio
            if rest:
                group["params"] = rest
                self.optimizer.add_param_group({**settings, "params": mine})
            else:
                group.update(settings)

    # --------------------------------------------------------------------------- data
    def prepare_data(self, cfg: Config) -> Tokenizer:
        v, vision = cfg.vlm, cfg.model.vision
        base = Tokenizer.load(_run_of(Path(v.base_checkpoint)) / "tokenizer.json")
        want = ckpt_io.read_state(Path(v.base_checkpoint)).get("tokenizer_sha256")
        if want and want != base.sha256():
            raise SpudError(f"the tokenizer beside {v.base_checkpoint} is not the one it was trained with")
        tok = base.with_image_token()
        if tok.image_id != vision.image_token_id:
            raise SpudError(f"<|image|> is id {tok.image_id} but model.vision.image_token_id is "
                            f"{vision.image_token_id}; start a new --out directory")
        tok.save(self.run_dir / "tokenizer.json")
        tok = Tokenizer.load(self.run_dir / "tokenizer.json")
        limit, tpi = cfg.seq_len + 1, vision.tokens_per_image
        sources = []
        for spec in v.data:
            path, weight = vlm_data.parse_data_spec(spec)
            if path == "builtin":
                sources.append(vlm_data.builtin_source(tok, self.stage, v.builtin_images, cfg.seed,
                                                       vision.image_size, tpi, weight, limit=limit,
                                                       kinds=tuple(v.builtin_kinds)))
            elif self.stage == "sft":  # user files are question-answer chats, not captions
                sources.append(vlm_data.load_image_source(spec, tok, vision, limit, v.val_fraction,
                                                          v.max_bad_fraction))
        if not sources:
            raise SpudError("the align stage needs the built-in pictures (vlm.data has no 'builtin'); "
                            "skip it with vlm.align_steps=0")
        val = []
        if v.val_images:  # more training-split pictures (never the eval's) for the validation loss
            val = list(vlm_data.builtin_source(tok, self.stage, v.val_images, cfg.seed + 1, vision.image_size,
                                               tpi, limit=limit, kinds=tuple(v.builtin_kinds)).train)
        val += [c for s in sources for c in s.val]
        if self.stage == "sft" and v.text_data and v.text_weight > 0:
            image_weight = sum(s.weight for s in sources)
            text = load_chat_data(v.text_data, tok, limit, cfg.sft.val_fraction, cfg.sft.max_bad_fraction,
                                  cfg.sft.builtin_conversations, cfg.seed)
            text_weight = sum(s.weight for s in text)
            for s in text:  # the text sources together weigh text_weight × the image sources
                s.weight = s.weight / text_weight * v.text_weight * image_weight
                s.summary["weight"] = s.weight
            sources += text
            val += [c for s in text for c in s.val]
        self.chat_sources, self.chat_val = sources, val
        self.data_summary = {"stage": self.stage, "sources": [s.summary for s in sources],
                             "train_conversations": sum(len(s.train) for s in sources),
                             "val_conversations": len(val),
                             "bad": sum(s.summary.get("bad", 0) for s in sources)}
        (self.run_dir / SUMMARY_FILE).write_text(json.dumps(self.data_summary, indent=2, default=str))
        return tok

    def make_loader(self, split: str):
        t = self.cfg.train
        common = dict(batch_size=t.micro_batch_size, seq_len=self.seq_len, seed=self.cfg.seed,
                      pad_id=self.tokenizer.pad_id, rank=getattr(self, "rank", 0),
                      world_size=getattr(self, "world", 1), vision_cfg=self.cfg.model.vision)
        if split == "train":
            return vlm_data.ImageChatLoader(self.chat_sources, None, **common)
        return vlm_data.ImageChatLoader(None, self.chat_val, **common)

    def val_available(self) -> bool:
        return bool(self.chat_val)

    def batch_inputs(self, batch: tuple) -> dict:
        return {"images": batch[2].to(self.device)} if len(batch) > 2 and len(batch[2]) else {}

    # ------------------------------------------------------------------------ weights
    def init_weights(self, model: torch.nn.Module) -> None:
        """align: the source model's weights + a fresh vision tower (the tower stage's, when it
        ran); sft: the align result (or, with vlm.align_steps=0, the source model + a fresh tower
        as align would start)."""
        state = ckpt_io.read_state(self.init_checkpoint)
        if self.stage == "sft" and (state["config"].get("model") or {}).get("vision"):
            ckpt_io.load_weights(self.init_checkpoint, model, "cpu")
            return
        from spud.model.vision import add_vision

        text_cfg = validate_config(state["config"], f"{self.init_checkpoint}/state.json").model
        text = build_model(text_cfg)
        ckpt_io.load_weights(self.init_checkpoint, text, "cpu")
        vision = self.cfg.model.vision
        grown = add_vision(text, vision, vision.image_token_id)
        model.load_state_dict(grown.state_dict())
        if self.tower is not None:
            from spud.posttrain.vlm_tower import load_tower

            load_tower(model, self.tower)

    def set_trainable(self, model: torch.nn.Module) -> None:
        v, vision = self.cfg.vlm, self.cfg.model.vision
        if self.stage == "sft":
            # vlm.sft_encoder false: the encoder the tower stage taught stays as it is (no
            # gradient, no optimizer state, no backward pass through the convolutions).
            for name, p in model.named_parameters():
                if name.startswith("vision.encoder."):
                    p.requires_grad = v.sft_encoder
            return
        train_encoder = v.align_encoder if v.align_encoder is not None else vision.encoder == "vit"
        for name, p in model.named_parameters():
            p.requires_grad = name.startswith("vision.") and (train_encoder or not name.startswith("vision.encoder."))

    def sample(self) -> list[dict]:
        """Greedy answers about two validation pictures (logged as samples)."""
        from spud.data import images
        from spud.eval.vqa import greedy_answers

        if not self.dist.is_main:
            return []
        pics = images.generate(2, self.cfg.seed + 2, size=self.cfg.model.vision.image_size)
        questions = [s.qa[0][1] if self.stage == "sft" else "Describe the image." for s in pics]
        answers = greedy_answers(self.model, self.tokenizer, questions, [s.image for s in pics],
                                 max_new_tokens=24)
        return [{"prompt": f"[{s.caption}] {q}", "text": a} for s, q, a in zip(pics, questions, answers)]


def _run_of(ckpt: Path) -> Path:
    """RUN/chat/checkpoints/step_N → RUN/chat: the run directory holding a checkpoint."""
    return ckpt.parent.parent


# ------------------------------------------------------------------------------- configuration
def vlm_config(run: str | Path, source: str | None, out: Path, overrides: list[str], resume: bool,
               data: list[str] | None = None) -> Config:
    """The VLM's config. New: the source checkpoint's config plus model.vision (defaults, then
    overrides), the grown vocabulary, the <|image|> id and the `vlm:` section. Resumed: the
    config the interrupted run saved (so it keeps its base checkpoint and settings even if the
    chat model has trained on since), then overrides."""
    saved = next((p for p in (out / "config.yaml", out / "align" / "config.yaml") if p.is_file()), None)
    if resume and saved is not None:
        tree = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
        if overrides:
            tree = _merge(tree, parse_overrides(overrides), "")
        if data:
            tree["vlm"]["data"] = list(data)
        return validate_config(tree, f"spud vlm {run} --resume ({saved})")
    source = source or "chat"
    base_ckpt = choose_model(run, source).checkpoint
    tree = ckpt_io.read_state(base_ckpt)["config"]
    if (tree.get("model") or {}).get("vision"):
        raise SpudError(f"{base_ckpt} already reads images; spud vlm starts from a text model")
    tree["model"]["vision"] = {}
    # The source's saved config holds a `vlm:` section with the defaults of its day; spud vlm's
    # settings are today's defaults plus this command's overrides.
    tree["vlm"] = {}
    if overrides:
        tree = _merge(tree, parse_overrides(overrides), "")
    if data:
        tree["vlm"]["data"] = list(data)
    tree["vlm"].update(source=source, base_run=str(Path(run).resolve()), base_checkpoint=str(base_ckpt.resolve()))
    tok = Tokenizer.load(_run_of(base_ckpt) / "tokenizer.json")
    image_id = tok.with_image_token().image_id
    vocab = tree["model"]["vocab_size"]
    if image_id >= vocab:
        vocab = (image_id + 1 + 63) // 64 * 64  # as spud.model.vision.add_vision grows it
    tree["model"]["vocab_size"] = vocab
    tree["model"]["vision"]["image_token_id"] = image_id
    return validate_config(tree, f"spud vlm {run}")


def stage_config(cfg: Config, stage: str) -> Config:
    """`train` for one stage, from the vlm section (like spud sft derives it from sft)."""
    v = cfg.vlm
    steps, lr = (v.align_steps, v.align_lr) if stage == "align" else (v.steps, v.lr)
    # Muon (the block matrices) and an untied embedding and head move by the same share of the
    # source model's LR as AdamW does: at the source run's own Muon LR, fine-tuning would undo
    # the chat model (as spud sft found).
    train = cfg.train.model_copy(update={
        "max_steps": steps, **cfg.train.scaled_lrs(lr / cfg.train.lr),
        "warmup_steps": min(v.warmup_steps, max(steps - 1, 0)),
        "min_lr_ratio": v.min_lr_ratio, "schedule": "cosine", "micro_batch_size": v.micro_batch_size,
        "tokens_per_step": None, "weight_decay": 0.0, "eval_every": v.eval_every,
        "eval_batches": v.eval_batches, "checkpoint_every": v.checkpoint_every, "sample_every": 0,
        "sample_prompts": [], "log_every": 1, "init_from": None})
    return validate_config({**cfg.model_dump(mode="json"), "train": train.model_dump(mode="json")},
                           f"spud vlm ({stage} stage)")


def _finished(run_dir: Path, steps: int) -> Path | None:
    ckpt = ckpt_io.latest_checkpoint(run_dir)
    if ckpt is not None and ckpt_io.read_state(ckpt).get("step", 0) >= steps:
        return ckpt
    return None


def _check_user_data(cfg: Config) -> None:
    """Read the user's image chat files once before any training: bad input fails in seconds,
    not after the align stage."""
    user = [s for s in cfg.vlm.data if vlm_data.parse_data_spec(s)[0] != "builtin"]
    if user:
        tok = Tokenizer.load(_run_of(Path(cfg.vlm.base_checkpoint)) / "tokenizer.json").with_image_token()
        for spec in user:
            vlm_data.load_image_source(spec, tok, cfg.model.vision, cfg.seq_len + 1, cfg.vlm.val_fraction,
                                       cfg.vlm.max_bad_fraction)


def vlm_cmd(run: str, source: str | None = None, data: list[str] | None = None, out: str | None = None,
            overrides: list[str] | None = None, resume: bool = False, console=None) -> dict:
    """`spud vlm RUN [--from chat] [--data FILE ...] [--out DIR] [key=value ...] [--resume]`
    → the stages' summaries."""
    out_dir = Path(out) if out else Path(run) / "vlm"
    align_dir = out_dir / "align"
    if not resume and (ckpt_io.list_checkpoints(out_dir) or ckpt_io.list_checkpoints(align_dir)):
        raise SpudError(f"{out_dir} already has vision checkpoints; pass --resume to continue, "
                        "or choose a new --out directory")
    cfg = vlm_config(run, source, out_dir, overrides or [], resume, data)
    _check_user_data(cfg)
    base_ckpt = Path(cfg.vlm.base_checkpoint)
    summary: dict = {"out": str(out_dir), "base_checkpoint": str(base_ckpt), "stages": {}}
    tower = None
    # The tower stage feeds the first stage that grows a fresh tower; a resumed stage has its own.
    first_dir = align_dir if cfg.vlm.align_steps else out_dir
    if cfg.vlm.tower_steps and not ckpt_io.list_checkpoints(first_dir):
        from spud.posttrain.vlm_tower import train_tower

        if console is None:
            from spud.ui import make_console

            console = make_console()
            console.quiet = int(os.environ.get("RANK", "0")) != 0
        result = train_tower(cfg, out_dir / "tower", console)
        tower = result.pop("state", None) or result.get("weights")
        summary["stages"]["tower"] = result
        if result.get("interrupted"):
            return {**summary, "interrupted": True}
    start = _finished(align_dir, cfg.vlm.align_steps) if resume else None
    if cfg.vlm.align_steps == 0:  # straight to multimodal SFT from the source model
        start = base_ckpt
    if start is None:
        trainer = VLMTrainer(stage_config(cfg, "align"), align_dir, "align", base_ckpt, tower=tower,
                             resume=resume, console=console)
        trainer.console.print(f"vlm align: {trainer.data_summary['train_conversations']:,} "
                              f"picture conversations · language model frozen · from {base_ckpt}")
        result = trainer.run()
        summary["stages"]["align"] = result
        if result.get("interrupted"):
            return {**summary, "interrupted": True}
        start = ckpt_io.latest_checkpoint(align_dir)
    trainer = VLMTrainer(stage_config(cfg, "sft"), out_dir, "sft", start, resume=resume, console=console,
                         tower=tower if cfg.vlm.align_steps == 0 else None)
    trainer.console.print(
        f"vlm sft: {trainer.data_summary['train_conversations']:,} train / "
        f"{trainer.data_summary['val_conversations']:,} val conversations (pictures and text), "
        f"{trainer.data_summary['bad']} bad (details: {out_dir / SUMMARY_FILE}) · from {start}")
    result = trainer.run()
    summary["stages"]["sft"] = result
    return {**summary, "interrupted": bool(result.get("interrupted")), "data": trainer.data_summary}
