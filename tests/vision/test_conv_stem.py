"""The from-scratch ViT's convolutional stem (model.vision.vit_stem=conv, the default): its shape,
FLOPs and activation memory against torch's own counts, the config rules, and that it learns a
picture property the linear patch embedding cannot see in one patch."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from spud.config import ModelConfig, VisionConfig, validate_config
from spud.errors import SpudError
from spud.model.flops import image_flops
from spud.model.memory import vision_activation_bytes
from spud.model.vision import ConvStem, VisionTower

TINY = dict(vocab_size=64, d_model=32, n_layers=1, n_heads=2)


def tower_cfg(**kw) -> ModelConfig:
    v = dict(image_size=16, patch_size=4, vit_dim=24, vit_layers=1, vit_heads=2, image_token_id=3)
    return ModelConfig(**TINY, vision=VisionConfig(**{**v, **kw}))


def test_conv_stem_is_the_default_and_keeps_the_token_grid():
    assert VisionConfig().vit_stem == "conv"
    cfg = tower_cfg()
    tower = VisionTower(cfg)
    assert isinstance(tower.encoder.stem, ConvStem) and not hasattr(tower.encoder, "patch_embed")
    out = tower.encoder(torch.randn(2, 3, 16, 16))
    assert out.shape == (2, 16, 24)  # (16 / 4)² patches of vit_dim, as the patch stem gives
    assert tower(torch.randn(2, 3, 16, 16)).shape == (2, cfg.vision.tokens_per_image, 32)


def test_channels_last_convolutions_give_the_same_tokens_in_the_same_order(monkeypatch):
    # The stem runs channels-last for speed (benchmarks/vlm_tower_step.py); its tokens must be
    # the NCHW stem's, row-major: token i·s + j is grid cell (i, j).
    torch.manual_seed(0)
    stem, x = ConvStem(4, 24), torch.randn(3, 3, 16, 16)
    fast = stem(x)
    monkeypatch.setattr(ConvStem, "channels_last", False)
    plain = stem(x)
    grid = stem.net(x)  # (N, 24, 4, 4)
    assert torch.allclose(fast, plain, atol=1e-5)
    assert torch.allclose(fast[:, 1 * 4 + 2], grid[:, :, 1, 2], atol=1e-5)


@pytest.mark.parametrize("kw", [{}, dict(vit_layers=0), dict(patch_size=2, pixel_shuffle=1), dict(patch_size=8, pixel_shuffle=1)])
def test_conv_stem_flops_match_flop_counter(kw):
    cfg = tower_cfg(**kw)
    tower = VisionTower(cfg)
    px = torch.randn(3, 3, 16, 16)
    with sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as fwd, torch.no_grad():
            tower(px)
        with FlopCounterMode(display=False) as train:
            tower(px).sum().backward()
    expected = image_flops(cfg)
    assert fwd.get_total_flops() == expected["forward"] * 3
    # the first convolution computes no input gradient (pixels need none)
    assert train.get_total_flops() == expected["training"] * 3


def test_conv_stem_activation_bytes_hand_computed():
    cfg = tower_cfg(vit_layers=0)
    # pixels 3·16², then per conv its output and its GELU's: 32 ch at 16², 32 at 16²; pool;
    # 64 at 8², 64 at 8²; pool; the last conv (vit_dim 24 at 4²) counted the same way
    stem = 3 * 256 + 2 * (32 * 256 + 32 * 256 + 64 * 64 + 64 * 64 + 24 * 16)
    projector = 4 * 4 * (4 * 24 + 2 * 32)  # fp32, 4 tokens of 4·24 in, d_model 32 twice
    assert vision_activation_bytes(cfg, 2, "fp32") == 2 * (4 * stem + projector)


def test_conv_stem_needs_a_power_of_two_patch():
    with pytest.raises(ValueError, match="patch_size=3 must be a power of 2"):
        VisionConfig(image_size=18, patch_size=3, pixel_shuffle=1)
    VisionConfig(image_size=18, patch_size=3, pixel_shuffle=1, vit_stem="patch")  # the ViT stem takes any


def test_bad_stem_is_a_user_error():
    """Through the config loader a user's override goes through: the message names the field."""
    with pytest.raises(SpudError, match="vit_stem"):
        validate_config({"model": {**TINY, "vision": {"vit_stem": "pixels"}}}, "overrides")


def test_conv_stem_trains():
    """A bright 2×2 dot in the upper or the lower half of the picture, at random columns: briefly
    trained, the stem (with no transformer block after it) must tell the halves apart on held-out
    pictures — a guard that the stem is wired into the tower and its weights learn."""
    torch.manual_seed(0)

    def pictures(n, seed):
        g = torch.Generator().manual_seed(seed)
        px = -torch.ones(n, 3, 16, 16)
        y = torch.randint(0, 2, (n,), generator=g)
        cols = torch.randint(0, 15, (n,), generator=g)
        for i in range(n):
            top = 3 if y[i] == 0 else 7  # straddles row 3|4 or 7|8: both 4-pixel patch boundaries
            px[i, :, top:top + 2, cols[i]:cols[i] + 2] = 1.0
        return px, y

    tower = VisionTower(tower_cfg(vit_layers=0, pixel_shuffle=1))
    head = torch.nn.Linear(16 * 32, 2)
    opt = torch.optim.AdamW([*tower.parameters(), *head.parameters()], lr=3e-3)
    x, y = pictures(256, 1)
    for step in range(40):
        i = torch.randint(0, 256, (32,))
        loss = F.cross_entropy(head(tower(x[i]).flatten(1)), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    xt, yt = pictures(128, 2)
    with torch.no_grad():
        acc = (head(tower(xt).flatten(1)).argmax(-1) == yt).float().mean().item()
    assert acc >= 0.9, acc
