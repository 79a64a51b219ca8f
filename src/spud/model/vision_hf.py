"""A pretrained SigLIP / CLIP vision encoder from a local Hugging Face directory
(`model.vision.encoder: hf`, `model.vision.hf_path: DIR`).

The directory is what `save_pretrained` or `huggingface-cli download --local-dir` writes: a
config.json (a vision model, or a full SigLIP / CLIP model, whose vision half is taken) and its
weights; preprocessor_config.json, when present, gives the normalisation. Nothing is downloaded:
spud runs offline, so a hub name is an error that says how to fetch the directory elsewhere.

The encoder keeps only the layers it uses: with hf_layer = -2 (LLaVA's choice, the penultimate
hidden state) the last layer is dropped at load time, so it costs neither memory nor FLOPs, and
SigLIP's attention-pooling head (unused: the language model needs every patch) is dropped too.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from spud.errors import SpudError
from spud.model.registry import register_vision_encoder

if TYPE_CHECKING:
    from spud.config import VisionConfig

# Defaults of each family's image processor, for directories without preprocessor_config.json.
_FAMILY_STATS = {
    "siglip": ([0.5] * 3, [0.5] * 3),
    "clip": ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]),
}


def _local_dir(cfg: VisionConfig) -> Path:
    path = Path(cfg.hf_path or "")
    if path.is_dir():
        return path
    looks_like_hub = not path.is_absolute() and str(path).count("/") == 1 and not str(path).startswith(".")
    if looks_like_hub:
        raise SpudError(
            f"model.vision.hf_path={cfg.hf_path!r} is not a local directory, and spud runs offline "
            "(it never downloads from the Hugging Face Hub). On a machine with network access run "
            f"`huggingface-cli download {cfg.hf_path} --local-dir DIR`, copy DIR here and set "
            "model.vision.hf_path=DIR"
        )
    raise SpudError(f"model.vision.hf_path={cfg.hf_path!r}: directory not found; give the local "
                    "directory of a SigLIP or CLIP vision model (it holds config.json)")


@lru_cache(maxsize=16)
def _family(path: str) -> str:
    """The model family of an HF directory: 'siglip' or 'clip' (else a clear error)."""
    file = Path(path) / "config.json"
    try:
        raw = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise SpudError(f"{file}: cannot read the Hugging Face config ({e})") from None
    kind = str(raw.get("model_type", ""))
    family = kind.removesuffix("_vision_model")
    if family not in _FAMILY_STATS:
        raise SpudError(f"{file}: model_type {kind!r} is not a SigLIP or CLIP model; spud loads "
                        "siglip, siglip_vision_model, clip and clip_vision_model")
    return family


@lru_cache(maxsize=16)
def _stats(path: str) -> tuple[list[float], list[float]]:
    """(mean, std) of the directory's image processor (read once: load_image runs per image)."""
    family = _family(path)
    mean, std = _FAMILY_STATS[family]
    pre = Path(path) / "preprocessor_config.json"
    if pre.is_file():
        try:
            raw = json.loads(pre.read_text())
        except ValueError as e:
            raise SpudError(f"{pre}: not valid JSON ({e})") from None
        mean, std = raw.get("image_mean", mean), raw.get("image_std", std)
    if not (isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std) == 3):
        raise SpudError(f"{pre}: image_mean and image_std must be lists of 3 numbers")
    return list(mean), list(std)


def _model_class(family: str):
    try:
        import transformers
    except ImportError:
        raise SpudError("model.vision.encoder=hf needs the transformers package: "
                        "pip install 'spud[export]' (or pip install transformers)") from None
    if family == "siglip":
        return transformers.SiglipVisionModel, transformers.SiglipVisionConfig
    return transformers.CLIPVisionModel, transformers.CLIPVisionConfig


def _load_weights(model_cls, path: Path) -> nn.Module:
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a per-tensor bar for a few ms of loading is noise
    try:
        return model_cls.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise SpudError(f"{path}: cannot load the vision weights ({e})") from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()


@register_vision_encoder("hf")
class HFVisionEncoder(nn.Module):
    """A pretrained SigLIP or CLIP vision transformer from a local Hugging Face directory (hf_path).

    Yields its patch states (CLIP's CLS state dropped)."""

    def __init__(self, cfg: VisionConfig, meta: bool = False) -> None:
        super().__init__()
        path = _local_dir(cfg)
        family = _family(str(path))
        model_cls, config_cls = _model_class(family)
        hf_cfg = config_cls.from_pretrained(str(path), local_files_only=True)
        for field in ("image_size", "patch_size"):
            if getattr(hf_cfg, field) != getattr(cfg, field):
                raise SpudError(f"model.vision.{field}={getattr(cfg, field)} but the encoder in {path} "
                                f"was trained with {field}={getattr(hf_cfg, field)}; set "
                                f"model.vision.{field}={getattr(hf_cfg, field)}")
        layers = hf_cfg.num_hidden_layers
        keep = cfg.hf_layer if cfg.hf_layer >= 0 else layers + 1 + cfg.hf_layer
        if not 1 <= keep <= layers:
            raise SpudError(f"model.vision.hf_layer={cfg.hf_layer} selects no layer of this "
                            f"{layers}-layer encoder; use -1 (last) ... -{layers} or 1 ... {layers}")
        if meta:  # flops.py counts on the meta device: shapes only, no file reads
            model = model_cls(hf_cfg)
        else:
            model = _load_weights(model_cls, path).float()
        core = getattr(model, "vision_model", model)  # transformers 4.x nests it, 5.x does not
        del core.encoder.layers[keep:]
        self.family = family
        # SigLIP's last_hidden_state is post-normed (so is what SigLIP-based VLMs use); a
        # truncated stack, or CLIP (whose post-norm is for the pooled CLS only), is used raw.
        self.post_norm = family == "siglip" and keep == layers
        for name in ("head",) + (() if self.post_norm else ("post_layernorm",)):
            if getattr(core, name, None) is not None:
                delattr(core, name)
        if hasattr(core, "use_head"):
            core.use_head = False
        self.core = core
        self.width = hf_cfg.hidden_size
        self.n_tokens = (hf_cfg.image_size // hf_cfg.patch_size) ** 2
        self.n_layers = keep
        self.heads, self.mlp_hidden = hf_cfg.num_attention_heads, hf_cfg.intermediate_size

    @staticmethod
    def default_stats(cfg: VisionConfig) -> tuple[list[float], list[float]]:
        return _stats(str(_local_dir(cfg)))

    def flops_per_image(self) -> tuple[float, float]:
        """(matmul FLOPs of one image, those of the patch convolution alone), flops.py
        convention: the convolution once per patch, every Linear once per token, QKᵀ and AV
        over all tokens in every layer."""
        t = self.n_tokens + (self.family == "clip")  # CLIP adds a CLS token
        patch = linears = 0.0
        for m in self.core.modules():
            if isinstance(m, nn.Conv2d):
                patch += 2 * m.weight.numel() * self.n_tokens
            elif isinstance(m, nn.Linear):
                linears += 2 * m.weight.numel() * t
        return patch + linears + self.n_layers * 4 * t * t * self.width, patch

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        h = self.core.embeddings(pixels)
        pre = getattr(self.core, "pre_layrnorm", None)  # CLIP only
        if pre is not None:
            h = pre(h)
        h = self.core.encoder(inputs_embeds=h)[0]
        if self.post_norm:
            h = self.core.post_layernorm(h)
        return h[:, 1:] if self.family == "clip" else h
