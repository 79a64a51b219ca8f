"""Config sections of the data and training stages (data mix, cleaning, tokenizer, train), the
VLM stage, and the model's vision sub-section. The text post-training sections (SFT, RL, DPO) are
in spud.config_posttrain. spud.config assembles them with the model section into `Config`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from spud.config_base import StrictModel


# ----------------------------------------------------------------------------------------- data
class CleanConfig(StrictModel):
    """Heuristic quality rules for one source (spud.data.clean): `kind` picks the default rule set,
    `rules` switches rules off/on or sets their bounds: {mean_word_length: {min: 3, max: 10},
    bullet_lines: false}."""

    kind: Literal["none", "text", "code"] = Field("none", description="none (off), text (Gopher/C4/"
                                                  "FineWeb rules) or code (StarCoder rules).")
    rules: dict[str, Any] = Field(default_factory=dict, description="Per-rule overrides by name.")


class DedupSettings(StrictModel):
    """Exact and MinHash near-duplicate removal across all sources (spud.data.dedup)."""

    exact: bool = Field(False, description="Drop documents whose normalised text was seen before.")
    near: bool = Field(False, description="Drop near-duplicates (MinHash + LSH, rensa).")
    threshold: float = Field(0.8, gt=0, le=1, description="Estimated Jaccard similarity of a near-duplicate.")
    ngram: int = Field(5, ge=1, description="Words per shingle.")
    num_perm: int = Field(128, ge=2, description="MinHash permutations.")
    bands: int | None = Field(None, ge=1, description="LSH bands; None = fitted to the threshold.")
    seed: int = 0


class SourceConfig(StrictModel):
    """One source of documents in the mix."""

    name: str = Field(description="Label used in the manifest and per-source metrics.")
    type: Literal["text", "jsonl", "parquet", "builtin", "hf"] = Field(
        description="text: .txt/.md files; jsonl/parquet: a named text field; builtin: offline "
        "generators; hf: a Hugging Face dataset (needs network)."
    )
    path: str | None = Field(None, description="File or directory (text, jsonl, parquet).")
    field: str = Field("text", description="jsonl field / parquet column holding the text.")
    split: Literal["file", "blank_lines"] = Field(
        "file", description="text sources: one document per file, or split on blank lines."
    )
    builtin: str | None = Field(
        None, description="builtin generator: stdlib_docs, stdlib_code, arithmetic, reasoning."
    )
    weight: float = Field(1.0, gt=0, description="Relative share of the mix's tokens.")
    max_documents: int | None = Field(None, gt=0, description="Read at most this many documents.")
    hf_name: str | None = None
    hf_config: str | None = None
    hf_split: str = "train"
    clean: CleanConfig = Field(default_factory=CleanConfig, description="Quality rules for this source.")

    @model_validator(mode="after")
    def _check_kind(self) -> SourceConfig:
        if self.type in ("text", "jsonl", "parquet") and not self.path:
            raise ValueError(f"source {self.name!r} of type {self.type} needs a 'path'")
        if self.type == "builtin" and not self.builtin:
            raise ValueError(f"source {self.name!r} of type builtin needs a 'builtin' name")
        if self.type == "hf" and not self.hf_name:
            raise ValueError(f"source {self.name!r} of type hf needs 'hf_name'")
        return self


class DataConfig(StrictModel):
    sources: list[SourceConfig] = Field(default_factory=list)
    total_tokens: int = Field(2_000_000, gt=0, description="Tokens in the mix (train + val).")
    val_fraction: float = Field(0.02, ge=0, lt=0.5, description="Share of documents held out; 0 = no validation.")
    shard_tokens: int = Field(10_000_000, gt=0, description="Tokens per shard file.")
    max_bad_fraction: float = Field(
        0.05, ge=0, le=1, description="Error out when more than this share of records is bad."
    )
    workers: int = Field(
        0, ge=0, le=256, description="Worker processes that run the quality rules, dedup hashing and "
        "tokenization during a build (1 = none); 0 = one per core (max 8) when a source is cleaned or "
        "deduplicated and total_tokens >= 2M, else 1. The output is the same for every value.")
    dedup: DedupSettings = Field(default_factory=DedupSettings, description="Duplicate removal.")


class TokenizerConfig(StrictModel):
    vocab_size: int = Field(4096, ge=300, le=1_000_000)
    train_bytes: int = Field(10_000_000, gt=0, description="Bytes of the mix sampled to train BPE.")
    min_frequency: int = Field(2, ge=1)


# ------------------------------------------------------------------------------------------ vlm
class VLMConfig(StrictModel):
    """The vision stages `spud vlm` adds to a run (spud.posttrain.vlm): align (the new vision
    tower learns to answer questions about pictures while the language model is frozen), then
    multimodal SFT of the whole model on pictures mixed with the text SFT data."""

    source: Literal["chat", "base", "rl", "dpo"] = Field("chat", description="Which model of the run to start from.")
    base_run: str | None = Field(None, description="Run the VLM starts from (set by spud vlm).")
    base_checkpoint: str | None = Field(None, description="Checkpoint loaded at step 0 (set by spud vlm).")
    data: list[str] = Field(default_factory=lambda: ["builtin"], description=(
        "Image chat data as 'path[:weight]' (.jsonl with image parts naming local files, or .parquet "
        "with image bytes); 'builtin' = the generated pictures (spud.data.images)."))
    text_data: list[str] = Field(default_factory=lambda: ["builtin"], description=(
        "Text chat data mixed into the SFT stage (spud sft's --data format); [] = none."))
    text_weight: float = Field(0.25, ge=0, description="Share of text conversations in the SFT stage, "
                               "relative to the image data's total weight of 1.")
    builtin_images: int = Field(20000, gt=0, description="Pictures generated for 'builtin'.")
    builtin_kinds: list[Literal["number", "word", "count", "locate", "bar", "arithmetic"]] = Field(
        default_factory=lambda: ["number", "count", "number", "count", "word", "locate", "bar", "arithmetic"],
        description="Kinds of built-in picture, drawn in turn (repeat one to draw it more often; numbers "
        "and counts, the slowest to learn, twice by default).")
    val_images: int = Field(256, ge=0, description="Extra training-split pictures for the validation loss.")
    tower_steps: int = Field(3600, ge=0, description="Steps of the tower stage: the fresh vision tower "
                             "alone learns the built-in pictures' answers through linear read-outs before "
                             "the language model reads it (spud.posttrain.vlm_tower; 0: none).")
    tower_lr: float = Field(1e-3, gt=0, description="Peak LR of the tower stage (AdamW, cosine; 2e-3 and "
                            "4e-3 read fewer numbers, measured: docs/vision.md).")
    tower_batch_size: int = Field(32, gt=0, description="Pictures per step of the tower stage.")
    tower_readout: Literal["linear", "attention"] = Field(
        "linear", description="The tower stage's read-outs: linear (one linear map of all the tower's "
        "tokens per question type) or attention (learnt queries attend over the tokens, as the "
        "language model will read them).")
    align_steps: int = Field(0, ge=0, description="Steps of the align stage (0: none, the SFT stage "
                             "starts from the source model with a fresh vision tower).")
    align_lr: float = Field(1e-3, gt=0, description="Peak LR of the vision tower in the align stage.")
    align_encoder: bool | None = Field(None, description="Train the encoder in the align stage (None: "
                                       "yes for the from-scratch vit, no for a pretrained hf encoder).")
    steps: int = Field(1000, gt=0, description="Steps of the multimodal SFT stage (a tower-stage "
                       "picture costs a quarter of an SFT one: 3,600 tower + 1,000 SFT steps read 74.5 % "
                       "of numbers against 70 % for 2,400 + 1,300 at lr 1e-3, in less time; docs/vision.md).")
    lr: float = Field(2e-3, gt=0, description="Peak LR of the language model in the SFT stage (dev "
                      "pictures: 2e-3 read 89 % of numbers against 76 % at 1e-3; 4e-3 read 87 % and "
                      "cost text skills; docs/vision.md).")
    vision_lr: float = Field(2e-4, gt=0, description="Peak LR of the vision tower in the SFT stage: low, "
                             "so the tower stage's tower keeps what it learnt while the language model "
                             "learns to read it (1e-3 read 48 % of counts against 70 % at 2e-4).")
    sft_encoder: bool = Field(True, description="Train the vision encoder in the SFT stage (at "
                              "vision_lr); false keeps the encoder the tower or align stage made, "
                              "and trains only the projector and the language model.")
    warmup_steps: int = Field(10, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    micro_batch_size: int = Field(8, gt=0)
    val_fraction: float = Field(0.05, ge=0, lt=0.5, description="Share of user conversations held out (by hash).")
    max_bad_fraction: float = Field(0.05, ge=0, le=1, description="Error out above this share of bad records.")
    eval_every: int = Field(400, gt=0, description="Steps between validations.")
    eval_batches: int = Field(4, gt=0)
    checkpoint_every: int = Field(400, gt=0)


# --------------------------------------------------------------------------------------- vision
class VisionConfig(StrictModel):
    """The image path of a vision-language model (`model.vision`; spud.model.vision). None (the
    default) is a text-only model. An image is resized to image_size², cut into patch_size²
    patches, encoded, merged pixel_shuffle² patches per token and projected into d_model: it
    occupies `tokens_per_image` <|image|> positions of the sequence."""

    encoder: str = Field(
        "vit", description="Image encoder from the model registry: vit (a ViT trained from scratch) "
        "or hf (a pretrained SigLIP/CLIP vision encoder from a local Hugging Face directory, hf_path).")
    hf_path: str | None = Field(None, description="Local directory of the HF vision encoder (encoder=hf).")
    hf_layer: int = Field(-1, description="HF encoder hidden state used (-1 last, -2 penultimate as LLaVA).")
    image_size: int = Field(32, gt=0, description="Square side in pixels every image is resized to.")
    patch_size: int = Field(4, gt=0, description="Square patch side in pixels (encoder=hf: the model's).")
    vit_dim: int = Field(96, gt=0, description="Width of the from-scratch ViT.")
    vit_layers: int = Field(0, ge=0, description="Transformer blocks of the from-scratch ViT after its stem "
                            "(0: the stem alone, the default: one block made the tower far slower to learn).")
    vit_stem: Literal["conv", "patch"] = Field(
        "conv", description="How the from-scratch ViT cuts pixels into patch vectors: conv (3×3 "
        "convolutions and 2×2 max-pools down to patch_size, a power of 2) or patch (one linear map "
        "of each flattened patch, the original ViT; far slower to learn to read small digits).")
    vit_heads: int = Field(4, gt=0, description="Attention heads of the from-scratch ViT.")
    pixel_shuffle: int = Field(2, gt=0, description="k: each k×k patches become one token (1 = off).")
    projector: Literal["mlp"] = Field("mlp", description="Encoder → d_model: a two-layer GELU MLP.")
    image_token_id: int | None = Field(
        None, ge=0, description="Id of <|image|> in the run's tokenizer (set by spud.model.vision.add_vision).")
    image_mean: list[float] | None = Field(
        None, description="Per-channel mean after scaling to [0, 1]; None = 0.5 (vit) or the HF "
        "directory's preprocessor_config.json (hf).")
    image_std: list[float] | None = Field(None, description="Per-channel std; None as image_mean.")

    @field_validator("encoder")
    @classmethod
    def _registered(cls, v: str) -> str:
        from spud.model.registry import unknown_message  # imports torch: only for a VLM config

        msg = unknown_message("vision.encoder", v)
        if msg:
            raise ValueError(msg)
        return v

    @model_validator(mode="after")
    def _check(self) -> VisionConfig:
        if self.encoder == "hf" and not self.hf_path:
            raise ValueError("encoder='hf' needs hf_path: a local Hugging Face directory holding a "
                             "SigLIP/CLIP vision model")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} is not a multiple of "
                             f"patch_size={self.patch_size}")
        side = self.image_size // self.patch_size
        if side % self.pixel_shuffle:
            raise ValueError(f"pixel_shuffle={self.pixel_shuffle} must divide the {side}×{side} patch "
                             f"grid (image_size / patch_size)")
        if self.encoder == "vit" and self.vit_stem == "conv" and self.patch_size & (self.patch_size - 1):
            raise ValueError(f"vit_stem='conv' halves the picture log2(patch_size) times: patch_size="
                             f"{self.patch_size} must be a power of 2 (or set vit_stem='patch')")
        if self.encoder == "vit" and self.vit_dim % self.vit_heads:
            raise ValueError(f"vit_dim={self.vit_dim} is not divisible by vit_heads={self.vit_heads}")
        for name in ("image_mean", "image_std"):
            v = getattr(self, name)
            if v is not None and (len(v) != 3 or (name == "image_std" and min(v) <= 0)):
                raise ValueError(f"{name}={v} must be 3 numbers (R, G, B)"
                                 + (", all positive" if name == "image_std" else ""))
        return self

    @property
    def tokens_per_image(self) -> int:
        """Sequence positions one image takes: patches after the pixel shuffle."""
        return (self.image_size // self.patch_size // self.pixel_shuffle) ** 2


# ---------------------------------------------------------------------------------------- train
ADAMW_DEFAULT_LR = 3e-3  # train.lr when train.optimizer is adamw and no lr is given


class TrainConfig(StrictModel):
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    seq_len: int | None = Field(None, gt=0, description="None = model.max_seq_len.")
    micro_batch_size: int = Field(8, gt=0, description="Sequences per forward pass.")
    tokens_per_step: int | None = Field(
        None, gt=0, description="Target tokens per optimizer step (gradient accumulation)."
    )
    max_steps: int = Field(200, gt=0)
    lr: float = Field(
        0.01, gt=0, description="Peak LR of the AdamW groups. Default: 0.01 with muon (AdamW then "
        "trains only embeddings, head and gains), 3e-3 with adamw (every weight).")
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(20, ge=0)
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    decay_fraction: float = Field(0.2, gt=0, le=1, description="wsd: share of steps decaying.")
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    # Optimizer (src/spud/train/optim.py). With muon, the blocks' weight matrices take Muon;
    # embeddings, LM head, norms and other scalars take AdamW at train.lr (embed_lr / head_lr).
    optimizer: Literal["adamw", "muon"] = Field("muon", description="adamw | muon (matrices in blocks).")
    muon_lr: float = Field(0.02, gt=0, description="Muon peak LR (spectral: × sqrt(max(1, out/in))).")
    muon_momentum: float = Field(0.95, ge=0, lt=1, description="Muon Nesterov momentum after warm-up.")
    muon_momentum_start: float = Field(0.85, ge=0, lt=1, description="Muon momentum at step 0.")
    muon_momentum_warmup_steps: int = Field(300, ge=0, description="Steps from start to full momentum.")
    muon_ns_steps: int = Field(5, ge=1, le=12, description="Polar Express orthogonalisation iterations.")
    muon_weight_decay: float = Field(0.0, ge=0, description="Decoupled decay of Muon matrices (× LR).")
    embed_lr: float | None = Field(None, gt=0, description="AdamW LR of embeddings; None = train.lr.")
    head_lr: float | None = Field(None, gt=0, description="AdamW LR of an untied LM head; None = train.lr.")
    grad_clip: float = Field(1.0, ge=0, description="0 disables clipping.")
    eval_every: int = Field(50, gt=0)
    eval_batches: int = Field(8, gt=0)
    sample_every: int = Field(0, ge=0, description="0 = only at the end.")
    sample_prompts: list[str] = Field(default_factory=lambda: ["The "])
    sample_tokens: int = Field(48, gt=0)
    checkpoint_every: int = Field(100, gt=0)
    keep_checkpoints: int = Field(3, gt=0)
    init_from: str | None = Field(
        None, description="Start from these weights (a run or checkpoint directory, e.g. from `spud "
        "import hf`): continued pretraining with a fresh optimizer; the model config must match.")
    compile: bool = False
    log_every: int = Field(1, gt=0)
    threads: int = Field(0, ge=0, description="CPU threads for torch; 0 = all cores.")
    # Scale-out and fault tolerance (README, "Scale-out").
    parallel: Literal["none", "ddp", "fsdp"] = Field(
        "none", description="Data parallelism under torchrun: ddp replicates, fsdp shards (FSDP2)."
    )
    dist_timeout_s: float = Field(300.0, gt=0, description="Timeout of every collective (s).")
    activation_checkpointing: bool = Field(False, description="Recompute each block in backward.")
    mixed_precision: bool = Field(True, description="CUDA+fsdp: bf16 params, fp32 grad reduce.")
    max_bad_steps: int = Field(5, gt=0, description="Consecutive non-finite steps → rollback.")
    rollback_lr_factor: float = Field(1.0, gt=0, le=1, description="LR multiplier per rollback.")
    debug_nan_at_step: list[int] = Field(
        default_factory=list, description="Testing aid: poison the loss at these steps (once each)."
    )

    @model_validator(mode="before")
    @classmethod
    def _default_lr_follows_optimizer(cls, data: Any) -> Any:
        # The measured defaults (docs/recipe.md): with Muon, AdamW trains only the embeddings,
        # head and gains, which want a higher LR than AdamW training every matrix does.
        if isinstance(data, dict) and "lr" not in data and data.get("optimizer") == "adamw":
            data = {**data, "lr": ADAMW_DEFAULT_LR}
        return data

    def scaled_lrs(self, ratio: float) -> dict[str, float | None]:
        """Every peak LR of this recipe times `ratio` (train.lr, muon_lr and, where set, embed_lr
        and head_lr): what fine-tuning stages use to move each optimizer group by the same share
        of its pretraining LR."""
        return {"lr": ratio * self.lr, "muon_lr": ratio * self.muon_lr,
                "embed_lr": None if self.embed_lr is None else ratio * self.embed_lr,
                "head_lr": None if self.head_lr is None else ratio * self.head_lr}
