"""Parameters, FLOPs and memory of the vision path, checked against the module itself, torch's
FlopCounterMode and the tensors autograd really saves; and what `spud info` prints for a VLM."""

import pytest
import torch
from rich.console import Console
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from spud.config import load_config, save_config
from spud.model.flops import flops_per_token, image_flops, param_counts
from spud.model.memory import training_memory, vision_activation_bytes
from spud.model.transformer import Transformer

VISION = dict(image_size=16, patch_size=4, vit_dim=32, vit_layers=2, vit_heads=2, pixel_shuffle=2,
              image_token_id=250)


@pytest.mark.parametrize("kw", [{}, dict(pixel_shuffle=1, vit_layers=1)])
def test_param_counts_include_the_tower(tiny, kw):
    cfg = tiny(vision={**VISION, **kw})
    model = Transformer(cfg)
    counts = param_counts(cfg)
    assert counts["total"] == model.num_params()
    assert counts["non_embedding"] == model.num_params(non_embedding=True)
    assert counts["vision"] == sum(p.numel() for p in model.vision.parameters()) > 0
    text = param_counts(tiny())
    assert counts["total"] == text["total"] + counts["vision"] and text["vision"] == 0
    assert counts["embedding"] == text["embedding"]


@pytest.mark.parametrize("kw", [{}, dict(pixel_shuffle=1), dict(vit_layers=3, vit_heads=4)])
def test_image_flops_match_flop_counter(tiny, kw):
    cfg = tiny(vision={**VISION, **kw})
    model = Transformer(cfg)
    px = torch.randn(3, 3, 16, 16)
    with sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as fwd, torch.no_grad():
            model.encode_images(px)
        with FlopCounterMode(display=False) as train:
            model.encode_images(px).sum().backward()
        model.vision.encoder.requires_grad_(False)
        with FlopCounterMode(display=False) as frozen:
            model.encode_images(px).sum().backward()
    expected = image_flops(cfg)
    assert fwd.get_total_flops() == expected["forward"] * 3
    assert train.get_total_flops() == expected["training"] * 3
    assert frozen.get_total_flops() == expected["training_frozen_encoder"] * 3
    assert expected["forward"] == expected["encoder"] + expected["projector"]


def test_vlm_forward_flops_are_tokens_plus_images(tiny):
    """A forward over a prompt with images = per-token count × positions + per-image count."""
    cfg = tiny(vision=VISION)
    model = Transformer(cfg)
    idx = torch.randint(0, 200, (2, 24))
    idx[:, 2:6] = 250
    idx[1, 10:14] = 250
    px = torch.randn(3, 3, 16, 16)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc, torch.no_grad():
        model(idx, images=px)
    expected = flops_per_token(cfg, 24)["forward"] * 2 * 24 + image_flops(cfg)["forward"] * 3
    assert fc.get_total_flops() == pytest.approx(expected, rel=1e-9)
    # the language model's per-token count is the text model's: the tower runs per image
    assert flops_per_token(cfg, 24) == flops_per_token(tiny(), 24)


def test_text_model_has_no_vision_counts(tiny):
    assert set(image_flops(tiny()).values()) == {0}
    assert vision_activation_bytes(tiny(), 8) == 0


def test_vision_activation_bytes_hand_computed(tiny):
    cfg = tiny(vision={**VISION, "vit_stem": "patch"})  # the conv stem's: tests/vision/test_conv_stem.py
    # 16 tokens of width 32 (MLP 128, 2 heads), 2 layers; 4 output tokens of d_model 64
    p, t, w = 4, 16, 32
    encoder = 2 * (p * t * (8 * w + 2 * 128) + 4 * t * 2) + p * t * (3 * 16 + w)
    projector = p * 4 * (4 * w + 2 * 64)
    assert vision_activation_bytes(cfg, 3, "fp32") == 3 * (encoder + projector)
    assert vision_activation_bytes(cfg, 3, "fp32", train_encoder=False) == 3 * projector
    with_images = training_memory(cfg, 2, 32, "fp32", images=3)
    without = training_memory(cfg, 2, 32, "fp32")
    assert with_images.activations - without.activations == 3 * (encoder + projector)
    assert without.weights == 4 * param_counts(cfg)["total"]


def test_vision_activation_bytes_near_what_autograd_saves(tiny):
    """The estimate is within 25% of the bytes autograd really keeps for the tower's backward
    (saved tensors, each storage once; CPU's fused attention keeps out + log-sum-exp, as the
    formula assumes)."""
    cfg = tiny(vision={**VISION, "vit_dim": 64, "vit_layers": 3})
    model = Transformer(cfg)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}  # model state
    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in weights:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.encode_images(torch.randn(4, 3, 16, 16))
    measured = sum(storages.values())
    estimate = vision_activation_bytes(cfg, 4, "fp32")
    assert estimate == pytest.approx(measured, rel=0.25)


def test_info_shows_the_vision_tower(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    cfg = load_config(None, ["model.vocab_size=256", "model.vision.image_size=32",
                             "model.vision.image_token_id=250"])
    save_config(cfg, run / "config.yaml")
    from spud.info import show_run

    console = Console(record=True, width=300)
    show_run(run, console)
    text = console.export_text()
    assert ("vision: ViT 96d, no transformer layers (conv stem), 32px images in 4px patches → 16 tokens/image "
            "(pixel shuffle 2)") in text
    save_config(load_config(None, ["model.vocab_size=256", "model.vision.image_size=32", "model.vision.vit_layers=2",
                                   "model.vision.image_token_id=250"]), run / "config.yaml")
    console = Console(record=True, width=300)
    show_run(run, console)
    assert "vision: ViT 2×96d (conv stem)" in console.export_text()
    assert "FLOPs/image forward" in text and "vision=" not in text


def test_info_lists_the_vision_encoders():
    from spud.info import options_table

    console = Console(record=True, width=300)
    console.print(options_table())
    text = console.export_text()
    assert "vision.encoder=vit: A ViT trained from scratch" in text
    assert "vision.encoder=hf: A pretrained SigLIP or CLIP" in text
