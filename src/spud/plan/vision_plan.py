"""The vision stages in a plan (`spud plan --vision-images N`): what adding an image path to the
planned language model costs, counted from the model itself like everything else the planner says.

The vision stages (`spud vlm`: tower, align, then multimodal SFT). The tower stage
(spud.posttrain.vlm_tower) trains the tower alone on `tower_images` pictures (steps × pictures
per step; default: spud vlm's vlm.tower_steps × vlm.tower_batch_size): per picture the tower's
training FLOPs plus its linear read-out heads, tokens_per_image·d_model inputs →
`readout_outputs` logits (answer positions × classes, summed over question types: 475 for the
built-in pictures with the demo's tokenizer; it depends on the tokenizer, so it is an input),
forward and backward. Align and SFT train on `images` pictures, one per sequence. Per image
they cost the tower's training FLOPs (spud.model.flops.image_flops: encoder and projector
forward and backward) plus the language model's training FLOPs for the image's
tokens_per_image positions and `text_tokens` of question and answer (the LM is run forward and
backward on them in both stages: align only freezes its weights, its activations still carry the
gradient to the projector). Memory is the training plan's layout (same FSDP degree, checkpointing
and micro-batch) with the tower's weights, optimizer state and activations for one image per
sequence added. The language model's size comes from the text plan: the scaling law says nothing
about how many images a model needs, so the image count is the user's input.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from spud.config import ModelConfig
from spud.config_sections import VisionConfig, VLMConfig
from spud.errors import SpudError
from spud.model.flops import flops_per_token, image_flops, param_counts
from spud.model.memory import USABLE_FRACTION, training_memory
from spud.plan.allocate import SECONDS_PER_DAY

DEFAULT_TEXT_TOKENS = 32  # a short question and answer per picture, as the built-in image data
# spud vlm's tower stage: vlm.tower_steps × vlm.tower_batch_size, read from the config's defaults
DEFAULT_TOWER_IMAGES = (VLMConfig.model_fields["tower_steps"].default
                        * VLMConfig.model_fields["tower_batch_size"].default)
DEFAULT_READOUT_OUTPUTS = 475  # the built-in pictures' answer positions × classes, demo tokenizer


def load_vision_config(path: str | None) -> VisionConfig:
    """The defaults, or a YAML file holding a `model.vision` section (a recipe) or the section's
    fields themselves."""
    if path is None:
        return VisionConfig()
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise SpudError(f"--vision-config {path}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise SpudError(f"--vision-config {path}: not valid YAML: {e}") from None
    if isinstance(raw, dict) and isinstance(raw.get("model"), dict) and "vision" in raw["model"]:
        raw = raw["model"]["vision"]
    if not isinstance(raw, dict):
        raise SpudError(f"--vision-config {path}: expected a mapping of model.vision fields")
    try:
        return VisionConfig.model_validate(raw)
    except ValueError as e:
        raise SpudError(f"--vision-config {path}: {e}") from None


def vision_stage(lm: ModelConfig, vision: VisionConfig, images: float, parallelism: dict, seq_len: int,
                 devices: int, effective_flops_per_s: float, price_per_hour: float, device_bytes: float,
                 precision: str, optimizer: str, text_tokens: int = DEFAULT_TEXT_TOKENS,
                 tower_images: float | None = None, readout_outputs: int | None = None) -> dict:
    """Compute, time, cost and memory of the vision stages on top of the planned model `lm`
    (tower_images / readout_outputs None: spud vlm's defaults)."""
    tower_images = DEFAULT_TOWER_IMAGES if tower_images is None else tower_images
    readout_outputs = DEFAULT_READOUT_OUTPUTS if readout_outputs is None else readout_outputs
    if not images > 0:
        raise SpudError(f"--vision-images must be > 0, got {images:g}")
    if text_tokens < 0:
        raise SpudError(f"--vision-text-tokens must be >= 0, got {text_tokens}")
    if not tower_images >= 0:
        raise SpudError(f"--vision-tower-images must be >= 0, got {tower_images:g}")
    if readout_outputs <= 0:
        raise SpudError(f"--vision-readout-outputs must be > 0, got {readout_outputs}")
    vlm = ModelConfig.model_validate({**lm.model_dump(), "vocab_size": lm.vocab_size + 1,  # + <|image|>
                                      "vision": vision.model_dump()})
    seq = vision.tokens_per_image + text_tokens
    if seq > vlm.max_seq_len:
        raise SpudError(f"an image takes {vision.tokens_per_image} positions, plus {text_tokens} text tokens: "
                        f"more than the model's context of {vlm.max_seq_len}")
    per_image = image_flops(vlm)
    lm_per_token = flops_per_token(vlm, seq)["training"]
    flops_per_image = per_image["training"] + seq * lm_per_token
    # The read-out heads: one matmul of the flattened tokens, forward + both backward products.
    readout = 3 * 2 * vision.tokens_per_image * vlm.d_model * readout_outputs
    tower_stage = tower_images * (per_image["training"] + readout)
    total = images * flops_per_image + tower_stage
    seconds = total / (devices * effective_flops_per_s)
    mb = max(1, parallelism["micro_batch"])
    mem = training_memory(vlm, mb, seq_len, precision, parallelism["fsdp"],
                          parallelism["checkpointing"], images=mb, optimizer=optimizer)
    return {
        "images": images, "tokens_per_image": vision.tokens_per_image, "text_tokens": text_tokens,
        "vision_params": param_counts(vlm)["vision"], "tower_flops_per_image": per_image["training"],
        "lm_flops_per_image": seq * lm_per_token, "tower_images": tower_images,
        "readout_flops_per_image": readout, "tower_stage_flops": tower_stage, "flops": total,
        "wall_clock_days": seconds / SECONDS_PER_DAY, "device_hours": seconds / 3600 * devices,
        "cost_usd": seconds / 3600 * devices * price_per_hour,
        "memory": mem.to_dict(), "fits": mem.total <= USABLE_FRACTION * device_bytes,
        "vision": vision.model_dump(exclude_none=True),
    }
