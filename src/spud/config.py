"""Typed, validated run configuration.

A config is data: pydantic models with defaults, loaded from a YAML recipe and overridden with
`key.sub=value` arguments. Unknown keys and wrong types become a SpudError that names the key,
the expected type and the closest valid key, because a typo in a 3-day run's config should fail
in the first second, not silently fall back to a default.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from spud.config_base import StrictModel
from spud.config_posttrain import DPOConfig, RLConfig, SFTConfig  # noqa: F401 - re-exported
from spud.config_sections import (  # noqa: F401 - re-exported: spud.config is the one import
    CleanConfig,
    DataConfig,
    DedupSettings,
    SourceConfig,
    TokenizerConfig,
    TrainConfig,
    VisionConfig,
    VLMConfig,
)
from spud.errors import SpudError
from spud.model.presets import PRESETS


# ---------------------------------------------------------------------------------------- model
class ModelConfig(StrictModel):
    """Decoder-only transformer dimensions. `preset` fills any field not given explicitly."""

    preset: str | None = None
    plugins: list[str] = Field(
        default_factory=list,
        description="Python modules imported first; they register extra block / MLP types.",
    )
    block: str = Field("llama", description="Block type from the model registry (spud info).")
    vocab_size: int | None = Field(None, gt=0, description="None = from the run's tokenizer.")
    d_model: int = Field(128, gt=0)
    n_layers: int = Field(4, gt=0)
    n_heads: int = Field(4, gt=0)
    n_kv_heads: int | None = Field(None, gt=0, description="None = n_heads (MHA); 1 = MQA.")
    head_dim: int | None = Field(None, gt=0, description="None = d_model // n_heads.")
    mlp: str = Field("swiglu", description="MLP type from the model registry (spud info).")
    mlp_hidden: int | None = Field(None, gt=0, description="None = the MLP's default: 8/3·d (swiglu) or 4·d.")
    norm_eps: float = Field(1e-5, gt=0)
    rope_theta: float = Field(10000.0, gt=0)
    qk_norm: bool = Field(True, description="RMSNorm on each head's queries and keys (bounded attention logits).")
    logit_softcap: float | None = Field(None, gt=0, description="cap·tanh(logits/cap) on the LM head (Gemma 2).")
    tie_embeddings: bool = Field(
        False, description="The LM head shares the token embedding matrix. Default untied: with "
        "Muon the two then learn at their own LRs (train.embed_lr, train.head_lr), which measured "
        "better per training FLOP (docs/recipe.md, fourth pass).")
    dropout: float = Field(0.0, ge=0, lt=1)
    max_seq_len: int = Field(256, gt=0)
    init_std: float = Field(0.02, gt=0)
    # Architecture options (docs/architecture.md). Each adds parameters only when on.
    zero_init_residual: bool = Field(False, description="Residual-output projections (attention out, MLP down) start at zero.")
    x0_mix: bool = Field(False, description="Learnable per-layer mix of the embedding output x0 into each block's input.")
    value_embeds: int = Field(0, ge=0, description="Value-embedding tables; table j feeds the values of layer j and layer n_layers-n+j.")
    unet_skips: bool = Field(False, description="First-half block outputs added, with learnable weights, to second-half inputs.")
    attn_pattern: str = Field("G", description="Per-layer attention, cycled: G global, L local (sliding window), e.g. LLLG.")
    attn_window: int = Field(128, gt=0, description="Positions a local (L) layer sees, its own included.")
    moe_experts: int = Field(0, ge=0, description="0 = dense MLP; else a mixture of this many model.mlp experts.")
    moe_top_k: int = Field(2, gt=0, description="Experts per token (MoE).")
    moe_aux_loss: float = Field(0.01, ge=0, description="Weight of the MoE load-balancing loss.")
    mtp_depth: int = Field(0, ge=0, description="Multi-token prediction heads (training only): extra tokens ahead.")
    mtp_weight: float = Field(0.3, ge=0, description="Weight of the multi-token prediction loss.")
    vision: VisionConfig | None = Field(None, description="Image encoder + projector (a VLM); None = text only.")

    @field_validator("plugins")
    @classmethod
    def _load_plugins(cls, v: list[str]) -> list[str]:
        from spud.model.registry import load_plugins  # imports torch: only when a model is named

        try:
            load_plugins(v)
        except SpudError as e:
            raise ValueError(str(e)) from None
        return v

    @field_validator("block", "mlp")
    @classmethod
    def _registered(cls, v: str, info: ValidationInfo) -> str:
        from spud.model.registry import unknown_message

        msg = unknown_message(info.field_name, v)
        if msg:
            raise ValueError(msg)
        return v

    @field_validator("attn_pattern")
    @classmethod
    def _pattern(cls, v: str) -> str:
        v = v.upper()
        if not v or set(v) - {"L", "G"}:
            raise ValueError(f"{v!r} must be a non-empty string of L (local) and G (global), e.g. LLLG")
        return v

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") is not None:
            name = data["preset"]
            if name not in PRESETS:
                raise ValueError(
                    f"unknown model preset {name!r}{_suggest(str(name), PRESETS)}; "
                    f"known presets: {', '.join(PRESETS)}"
                )
            data = {**PRESETS[name], **data}
        return data

    @model_validator(mode="after")
    def _check_dims(self) -> ModelConfig:
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(
                f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                "set head_dim explicitly or change n_heads"
            )
        if self.kv_heads > self.n_heads or self.n_heads % self.kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.kv_heads}"
            )
        if self.dim_head % 2:
            raise ValueError(f"head_dim={self.dim_head} must be even for rotary embeddings")
        if self.moe_experts and self.moe_top_k > self.moe_experts:
            raise ValueError(f"moe_top_k={self.moe_top_k} exceeds moe_experts={self.moe_experts}")
        if 2 * self.value_embeds > self.n_layers:
            raise ValueError(
                f"value_embeds={self.value_embeds} needs n_layers >= {2 * self.value_embeds} "
                "(each table feeds one of the first and one of the last layers)"
            )
        image_id = self.vision.image_token_id if self.vision is not None else None
        if image_id is not None and self.vocab_size is not None and image_id >= self.vocab_size:
            raise ValueError(f"vision.image_token_id={image_id} is outside the vocabulary "
                             f"(vocab_size={self.vocab_size}); use spud.model.vision.add_vision")
        return self

    def window_at(self, layer: int) -> int | None:
        """Attention window of a layer: attn_window for an L in attn_pattern, None (global) for G."""
        return self.attn_window if self.attn_pattern[layer % len(self.attn_pattern)] == "L" else None

    def arch_options(self) -> dict[str, Any]:
        """The architecture options in use (fields after init_std): those that differ from their
        defaults, with the settings of an option that is on and without those of one that is off."""
        fields = type(self).model_fields
        names = list(fields)[list(fields).index("init_std") + 1 :]
        settings = {"attn_window": "L" in self.attn_pattern, "moe_top_k": bool(self.moe_experts),
                    "moe_aux_loss": bool(self.moe_experts), "mtp_weight": bool(self.mtp_depth)}
        return {k: getattr(self, k) for k in names
                if settings.get(k, getattr(self, k) != fields[k].default)}

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def hidden(self) -> int:
        if self.mlp_hidden:
            return self.mlp_hidden
        from spud.model.registry import get_mlp

        default = getattr(get_mlp(self.mlp), "default_hidden", None)
        return default(self.d_model) if default else 4 * self.d_model


# train.embed_lr / train.head_lr of the default recipe (Muon, untied head) as multiples of
# train.lr (0.01: 0.05 and 0.005), chosen on validation bpb at equal FLOPs (docs/recipe.md,
# fourth pass). As multiples, an LR sweep over train.lr moves all AdamW groups together.
MUON_UNTIED_LR_RATIOS = {"embed_lr": 5.0, "head_lr": 0.5}


class Config(StrictModel):
    seed: int = 1337
    data: DataConfig = Field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    rl: RLConfig = Field(default_factory=RLConfig)
    dpo: DPOConfig = Field(default_factory=DPOConfig)
    vlm: VLMConfig = Field(default_factory=VLMConfig)

    @model_validator(mode="after")
    def _untied_lrs_follow_recipe(self) -> Config:
        # The measured default (docs/recipe.md, fourth pass): an untied embedding learns far
        # faster than the head, and both differ from the gains' train.lr. Filled in only where
        # the config does not say, and only for the recipe they were measured with (Muon,
        # untied); the resolved numbers are written into the run's config.yaml, so a resumed
        # run, `spud sft` and `spud vlm` read them back as given.
        t = self.train
        if t.optimizer == "muon" and not self.model.tie_embeddings:
            update = {k: r * t.lr for k, r in MUON_UNTIED_LR_RATIOS.items()
                      if k not in t.model_fields_set}
            if update:
                self.train = t.model_copy(update=update)
        return self

    @property
    def seq_len(self) -> int:
        return self.train.seq_len or self.model.max_seq_len

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# ------------------------------------------------------------------------------------- loading
def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def _suggest(key: str, options: Any) -> str:
    close = difflib.get_close_matches(key, [str(o) for o in options], n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _model_at(path: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model class that owns the field at `path` (to list valid sibling keys)."""
    model: type[BaseModel] | None = Config
    for part in path:
        if model is None or isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        candidates = [ann, *args]
        model = None
        for c in candidates:
            inner = getattr(c, "__args__", ())
            for cc in (c, *inner):
                if isinstance(cc, type) and issubclass(cc, BaseModel):
                    model = cc
    return model


def _format_errors(err: ValidationError, origin: str) -> str:
    lines = [f"invalid config ({origin}):"]
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        key = ".".join(str(p) for p in loc) or "<root>"
        if e["type"] == "extra_forbidden":
            owner = _model_at(loc[:-1])
            valid = list(owner.model_fields) if owner else []
            hint = _suggest(str(loc[-1]), valid)
            lines.append(f"  unknown key '{key}'{hint}; valid keys here: {', '.join(valid)}")
        elif e["type"] == "value_error":
            lines.append(f"  {key}: {e['msg'].removeprefix('Value error, ')}")
        else:
            owner = _model_at(loc[:-1]) if loc else None
            field = owner.model_fields.get(str(loc[-1])) if owner and loc else None
            expected = _type_name(field.annotation) if field else "?"
            got = e.get("input")
            lines.append(f"  {key}: {e['msg']} (expected {expected}, got {got!r})")
    return "\n".join(lines)


def _type_name(ann: Any) -> str:
    text = str(ann) if not isinstance(ann, type) else ann.__name__
    return text.replace("typing.", "")


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`a.b=1` strings → nested dict. Values are parsed as YAML scalars (1, 0.5, true, null, [..])."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise SpudError(f"override {item!r} is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        parts = key.strip().split(".")
        if not all(parts):
            raise SpudError(f"override {item!r} has an empty key part")
        node = tree
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise SpudError(f"override {item!r} conflicts with an earlier override")
        node[parts[-1]] = value
    return tree


def _merge(base: Any, over: Any, path: str) -> Any:
    """Deep-merge overrides into the YAML tree; list items are addressed by integer index."""
    if not isinstance(over, dict):
        return over
    if isinstance(base, list):
        out = list(base)
        for k, v in over.items():
            try:
                i = int(k)
            except ValueError:
                raise SpudError(f"'{path}{k}': '{path[:-1]}' is a list; use an index") from None
            if not 0 <= i < len(out):
                raise SpudError(f"'{path}{k}': index out of range (list has {len(out)} items)")
            out[i] = _merge(out[i], v, f"{path}{k}.")
        return out
    out = dict(base) if isinstance(base, dict) else {}
    for k, v in over.items():
        out[k] = _merge(out.get(k), v, f"{path}{k}.")
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML recipe (or the defaults), apply `key=value` overrides, validate."""
    tree: dict[str, Any] = {}
    origin = "defaults"
    if path is not None:
        p = Path(path)
        origin = str(p)
        if not p.is_file():
            raise SpudError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise SpudError(f"{p}: not valid YAML: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise SpudError(f"{p}: top level must be a mapping of sections, got {type(loaded)}")
        tree = loaded or {}
    if overrides:
        tree = _merge(tree, parse_overrides(overrides), "")
        origin += " + overrides"
    return validate_config(tree, origin)


def validate_config(tree: dict[str, Any], origin: str = "config") -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise SpudError(_format_errors(e, origin)) from None


def save_config(cfg: Config, path: str | Path) -> None:
    """Atomic (temp file, fsync, rename): a crash mid-write leaves the old file or the new one,
    never a cut-off config that a later `--resume` would misread."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # plain open: the umask applies
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(cfg.to_yaml())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
