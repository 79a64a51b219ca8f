"""The image path of a vision-language model: image loading, encoders, projector, and the merge of
image embeddings into the language model's token embeddings.

An image becomes `tokens_per_image` vectors of width d_model (LLaVA / nanoVLM layout):
    load_image: decode, RGB, resize to image_size², scale to [0, 1], normalise (THE preprocessing:
        training, eval and serving all call it, so a served image is what the model trained on)
    encoder: (N, 3, S, S) → (N, patches, width); the registered `model.vision.encoder` —
        "vit" (ViTEncoder below, trained from scratch) or "hf" (vision_hf.py, pretrained)
    pixel shuffle: k×k neighbouring patches → one token of k²·width (k = pixel_shuffle), which
        cuts the language model's sequence by k² at no loss of information (Idefics3 / nanoVLM)
    projector: a two-layer GELU MLP into d_model (LLaVA-1.5)
In the prompt an image is tokens_per_image consecutive <|image|> ids; `merge_image_embeds` puts
the projected vectors at those positions in place of the token embedding.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import nn

from spud.errors import SpudError
from spud.model.layers import RMSNorm, init_weights, linear
from spud.model.mlp import GELU
from spud.model.registry import get_vision_encoder, register_vision_encoder

if TYPE_CHECKING:
    from spud.config import ModelConfig, VisionConfig
    from spud.model.transformer import Transformer

# Refused before decoding: a 20 MB file or a 40-megapixel image is not a chat attachment, and
# decoding one costs seconds and hundreds of MB (PIL's own bomb check is at ~89 Mpx).
MAX_IMAGE_BYTES = 20 * 2**20
MAX_IMAGE_PIXELS = 40_000_000
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")


# ------------------------------------------------------------------------------ preprocessing
def load_image(
    source: bytes | str | Path | Image.Image, cfg: VisionConfig, *,
    max_bytes: int = MAX_IMAGE_BYTES, max_pixels: int = MAX_IMAGE_PIXELS,
) -> torch.Tensor:
    """An image file / encoded bytes / PIL image → (3, image_size, image_size) float32, normalised.

    Transparent pixels are composited on white (rendered text on a transparent background stays
    readable); animated images give their first frame; a photo's EXIF orientation is applied;
    the image is squashed to a square, which keeps every pixel (no crop) at the cost of the
    aspect ratio. Unreadable, oversized or unsupported input raises SpudError naming the source."""
    name = "image"
    if isinstance(source, Image.Image):
        img = source
    else:
        if isinstance(source, (str, Path)):
            name = str(source) if len(str(source)) <= 200 else str(source)[:200] + "…"
            if name.startswith(("http://", "https://")):
                raise SpudError(f"{name}: remote images cannot be fetched (spud runs offline); "
                                "download the file and pass its local path")
            path = Path(source)
            try:
                size = path.stat().st_size if path.is_file() else None
                if size is not None and size <= max_bytes:
                    data = path.read_bytes()
            except OSError as e:  # unreadable, or a name too long to be a path
                raise SpudError(f"{name}: cannot read the image file ({e.strerror})") from None
            if size is None:
                raise SpudError(f"{name}: image file not found")
            if size > max_bytes:
                raise SpudError(f"{name}: {size:,} bytes, over the {max_bytes:,}-byte image limit; "
                                "shrink or recompress it")
        elif isinstance(source, (bytes, bytearray, memoryview)):
            data = bytes(source)
        else:
            raise SpudError(f"load_image: expected bytes, a path or a PIL image, got {type(source).__name__}")
        if len(data) > max_bytes:
            raise SpudError(f"{name}: {len(data):,} bytes, over the {max_bytes:,}-byte image limit")
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError:  # PIL's own check of the header's pixel count
            raise SpudError(f"{name}: the image's pixel count is over the limit of "
                            f"{max_pixels:,} pixels; resize it first") from None
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise SpudError(f"{name}: not a readable image ({e}); send PNG, JPEG, WebP, GIF or BMP") from None
        if img.format not in IMAGE_FORMATS:
            raise SpudError(f"{name}: image format {img.format} is not supported; use one of "
                            f"{', '.join(IMAGE_FORMATS)}")
    w, h = img.size
    if w * h > max_pixels or w < 1 or h < 1:
        raise SpudError(f"{name}: {w}×{h} pixels is outside the limit of {max_pixels:,} pixels; "
                        "resize it first")
    try:
        img.seek(0)  # first frame of an animation (a no-op for still images)
        img.load()
        img = _to_rgb(ImageOps.exif_transpose(img))
        img = img.resize((cfg.image_size, cfg.image_size), Image.Resampling.BICUBIC)
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        raise SpudError(f"{name}: the image data is damaged ({e})") from None
    x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float().div_(255)
    mean, std = image_stats(cfg)
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def image_stats(cfg: VisionConfig) -> tuple[list[float], list[float]]:
    """Per-channel (mean, std) that load_image normalises with: the config's, else the encoder's
    own (0.5 for the ViT: pixels in [-1, 1]; an HF encoder's preprocessor_config.json)."""
    mean, std = get_vision_encoder(cfg.encoder).default_stats(cfg)
    return list(cfg.image_mean or mean), list(cfg.image_std or std)


# ---------------------------------------------------------------------------------- the ViT
class ViTAttention(nn.Module):
    """Bidirectional multi-head self-attention over the patches (no mask, no rotary: position
    comes from the encoder's learned position embeddings)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = linear(dim, 3 * dim)
        self.proj = linear(dim, dim)

    def flops_per_token(self, seq_len: int) -> int:
        """Projections plus QKᵀ and AV over all seq_len patches (flops.py convention)."""
        dim = self.proj.in_features
        return 2 * (self.qkv.weight.numel() + self.proj.weight.numel()) + 4 * seq_len * dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class ViTBlock(nn.Module):
    """Pre-norm: x + attn(norm(x)), then x + mlp(norm(x)), with spud's RMSNorm and GELU MLP."""

    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(dim)
        self.attn = ViTAttention(dim, heads)
        self.mlp_norm = RMSNorm(dim)
        self.mlp = GELU(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class ConvStem(nn.Module):
    """Pixels → a grid of patch vectors by convolution: per halving, two 3×3 convolutions (32·2^i
    channels, GELU) and a 2×2 max-pool, log2(patch_size) times, then a 3×3 convolution to `width`.

    Why not ViT's linear patch embedding: a rendered digit at 32 px is ~8 px tall, so a 4×4 patch
    sees a quarter of one stroke pattern, and a from-scratch ViT must learn to assemble digits in
    attention from a few thousand pictures. Measured (docs/vision.md, probe A): with the same
    tower and budget (600 steps of 32 pictures) the linear patch embedding read 2 % of held-out
    numbers, this stem 15 % (68 % with the stem alone at 1,200 steps); counting 53 % → 94 %."""

    def __init__(self, patch: int, width: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for i in range(patch.bit_length() - 1):  # log2(patch) halvings
            c = 32 * 2**i
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.GELU(), nn.Conv2d(c, c, 3, padding=1), nn.GELU(),
                       nn.MaxPool2d(2)]
            c_in = c
        layers.append(nn.Conv2d(c_in, width, 3, padding=1))
        self.net = nn.Sequential(*layers)
        # He init: torch's default for convolutions draws weights at a third of the variance
        # that keeps a GELU stack's signal level, so five layers shrank the pictures' signal to
        # a few hundredths, under the position embeddings added next; training then sat on a
        # plateau whose length depended on the seed (measured: 2 % vs 26 % of numbers read
        # after 600 tower steps, seeds 1337 vs 0).
        for m in self.net:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def flops_and_values(self, size: int) -> tuple[int, int, int]:
        """(forward FLOPs of the convolutions, those of the first one — its input, the pixels,
        needs no gradient —, activation values kept for backward) for one size×size picture."""
        flops, first, values, side = 0, None, 3 * size * size, size  # the pixels: the first conv's input
        for m in self.net:
            if isinstance(m, nn.MaxPool2d):
                side //= 2
            elif isinstance(m, nn.Conv2d):
                f = 2 * side * side * m.weight.numel()
                flops, first = flops + f, f if first is None else first
                values += 2 * side * side * m.out_channels  # its output, and the GELU's after it
        return flops, first, values

    # Channels-last convolutions: oneDNN's (CPU) and cuDNN's fast kernels want NHWC. The weights stay
    # in the default layout (checkpoints unchanged); the input's layout picks the kernels.
    # benchmarks/vlm_tower_step.py measures the two layouts against each other.
    channels_last = True

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        x = self.net(pixels)  # (N, width, s, s)
        return x.permute(0, 2, 3, 1).flatten(1, 2)  # → (N, s·s, width), row-major


@register_vision_encoder("vit")
class ViTEncoder(nn.Module):
    """A ViT trained from scratch (vit_dim, vit_layers, vit_heads).

    A stem (vit_stem: the ConvStem above, or ViT's Linear on flattened patch_size² RGB patches)
    + learned position embeddings + vit_layers pre-norm blocks + a final norm."""

    def __init__(self, cfg: VisionConfig, meta: bool = False) -> None:
        super().__init__()
        self.patch = cfg.patch_size
        self.image_size = cfg.image_size
        self.n_tokens = (cfg.image_size // cfg.patch_size) ** 2
        self.width, self.n_layers, self.heads = cfg.vit_dim, cfg.vit_layers, cfg.vit_heads
        self.mlp_hidden = 4 * cfg.vit_dim
        if cfg.vit_stem == "conv":
            self.stem = ConvStem(cfg.patch_size, cfg.vit_dim)
        else:
            self.patch_embed = linear(3 * self.patch**2, cfg.vit_dim)
        self.pos_embed = nn.Parameter(torch.empty(self.n_tokens, cfg.vit_dim))
        self.blocks = nn.ModuleList(ViTBlock(cfg.vit_dim, cfg.vit_heads, self.mlp_hidden)
                                    for _ in range(cfg.vit_layers))
        self.norm = RMSNorm(cfg.vit_dim)
        init_weights(self, 0.02, max(cfg.vit_layers, 1))  # Linear only: the convolutions keep torch's init
        nn.init.normal_(self.pos_embed, std=0.02)

    @staticmethod
    def default_stats(cfg: VisionConfig) -> tuple[list[float], list[float]]:
        return [0.5] * 3, [0.5] * 3

    def stem_values(self) -> int:
        """Activation values the stem keeps for backward per image (the memory estimate's)."""
        if hasattr(self, "stem"):
            return self.stem.flops_and_values(self.image_size)[2]
        return self.n_tokens * (3 * self.patch**2 + self.width)

    def flops_per_image(self) -> tuple[float, float]:
        """(all matmul and convolution FLOPs of one image, those of the stem's first layer alone)."""
        n = self.n_tokens
        if hasattr(self, "stem"):
            stem, first, _ = self.stem.flops_and_values(self.image_size)
        else:
            stem = first = n * 2 * self.patch_embed.weight.numel()
        return stem + n * sum(_module_flops(b, n) for b in self.blocks), first

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        n, c, h, w = pixels.shape
        p = self.patch
        if hasattr(self, "stem"):
            x = self.stem(pixels)
        else:  # (N, 3, H, W) → (N, patches, 3·p·p), patches in row-major order
            x = pixels.view(n, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(n, -1, c * p * p)
            x = self.patch_embed(x)
        x = x + self.pos_embed.to(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def _module_flops(module: nn.Module, seq_len: int) -> float:
    from spud.model.flops import module_flops

    return module_flops(module, seq_len)


# ------------------------------------------------------------------------ tower (the module)
def pixel_shuffle(x: torch.Tensor, k: int) -> torch.Tensor:
    """(N, s·s, C) patches on an s×s grid → (N, (s/k)², k²·C): each k×k block becomes one token."""
    if k == 1:
        return x
    n, t, c = x.shape
    s = math.isqrt(t)
    x = x.view(n, s // k, k, s // k, k, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(n, (s // k) ** 2, k * k * c)


class MLPProjector(nn.Module):
    """k²·width → d_model → d_model with a GELU between (LLaVA-1.5's projector)."""

    def __init__(self, d_in: int, d_model: int) -> None:
        super().__init__()
        self.fc1 = linear(d_in, d_model)
        self.fc2 = linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class VisionTower(nn.Module):
    """`Transformer.vision`: pixels (N, 3, S, S) → (N, tokens_per_image, d_model)."""

    def __init__(self, cfg: ModelConfig, meta: bool = False) -> None:
        super().__init__()
        v = cfg.vision
        assert v is not None
        self.cfg = v
        self.encoder = get_vision_encoder(v.encoder)(v, meta)
        if self.encoder.n_tokens != (v.image_size // v.patch_size) ** 2:
            raise SpudError(f"model.vision: the encoder yields {self.encoder.n_tokens} patches, "
                            f"not (image_size / patch_size)² = {(v.image_size // v.patch_size) ** 2}")
        self.projector = MLPProjector(v.pixel_shuffle**2 * self.encoder.width, cfg.d_model)
        init_weights(self.projector, cfg.init_std, 1)

    def flops_per_token(self, seq_len: int) -> int:
        """0: the tower runs once per image, not per text token; see `flops_per_image`, which
        flops.image_flops reports, so the language model's per-token count is unchanged."""
        return 0

    def flops_per_image(self) -> dict[str, int]:
        """Forward matmul FLOPs of one image: encoder, projector, and the two matmuls whose input
        needs no gradient in training (patch embedding: pixels; fc1: a frozen encoder's output)."""
        t = self.cfg.tokens_per_image
        encoder, patch = self.encoder.flops_per_image()
        out = {"encoder": encoder, "projector": t * _module_flops(self.projector, 1),
               "patch_embed": patch, "projector_in": t * 2 * self.projector.fc1.weight.numel()}
        return {k: round(v) for k, v in out.items()}

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        s = self.cfg.image_size
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, s, s):
            raise SpudError(f"images must be a (N, 3, {s}, {s}) tensor (model.vision.image_size={s}; "
                            f"load them with spud.model.vision.load_image), got {tuple(pixels.shape)}")
        w = self.projector.fc1.weight  # load_image gives fp32 CPU pixels; a model may be bf16 / GPU
        x = self.encoder(pixels.to(device=w.device, dtype=w.dtype))
        return self.projector(pixel_shuffle(x, self.cfg.pixel_shuffle).to(w.dtype))


# ---------------------------------------------------------------- merging into the sequence
def merge_image_embeds(x: torch.Tensor, idx: torch.Tensor, embeds: torch.Tensor,
                       image_id: int | None) -> torch.Tensor:
    """x (B, T, d) token embeddings with the <|image|> positions of idx (row-major) replaced by
    the rows of embeds (M, d) — or (N, tokens_per_image, d), flattened. M must equal the number
    of placeholders: a chunk of a prompt passes exactly the slice of rows that falls in it."""
    if image_id is None:
        raise SpudError("image_embeds given, but model.vision.image_token_id is not set; build the "
                        "model with spud.model.vision.add_vision (it records the <|image|> id)")
    embeds = embeds.reshape(-1, embeds.shape[-1])
    if embeds.shape[-1] != x.shape[-1]:
        raise SpudError(f"image_embeds have width {embeds.shape[-1]}, the model's d_model is {x.shape[-1]}")
    mask = idx == image_id
    m = int(mask.sum())  # one host sync, only for inputs that carry images
    if m != embeds.shape[0]:
        raise SpudError(f"image_embeds has {embeds.shape[0]} rows but the token ids hold {m} <|image|> "
                        f"placeholders (id {image_id}); pass one row per placeholder, in order")
    return x.index_put((mask,), embeds.to(x.dtype))


def vlm_vocab_size(vocab_size: int, image_id: int) -> int:
    """The vocabulary a VLM needs: unchanged when image_id fits, else the next multiple of 64
    above it (the padding the trainer gives a tokenizer's vocabulary)."""
    return vocab_size if image_id < vocab_size else (image_id + 1 + 63) // 64 * 64


def add_vision(model: Transformer, vision: VisionConfig, image_id: int) -> Transformer:
    """A text model + a fresh vision tower: a new Transformer whose config has `model.vision`
    (with image_token_id = image_id) and whose language-model weights are the given model's.
    When image_id falls outside the vocabulary, the vocabulary grows to the next multiple of 64;
    new rows start at the mean embedding (a neutral token, not a random one)."""
    from spud.model.transformer import Transformer

    old = model.cfg
    cfg = old.model_copy(update={"vocab_size": vlm_vocab_size(old.vocab_size, image_id),
                                 "vision": vision.model_copy(update={"image_token_id": image_id})})
    w = model.embed.weight
    new = Transformer(cfg).to(device=w.device, dtype=w.dtype)
    state, targets = {}, new.state_dict()
    for k, t in model.state_dict().items():
        target = targets[k]
        if t.shape != target.shape:  # vocabulary-sized: embed, untied lm_head, value embeddings
            t = torch.cat([t, t.mean(0, keepdim=True).expand(target.shape[0] - t.shape[0], -1)])
        state[k] = t
    missing, unexpected = new.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("vision.") for k in missing), (missing, unexpected)
    return new
