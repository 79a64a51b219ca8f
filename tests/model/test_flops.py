import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from spud.config import ModelConfig
from spud.errors import SpudError
from spud.model.flops import flops_per_token, param_counts
from spud.model.registry import build_model

CONFIGS = [
    dict(),
    dict(tie_embeddings=False),
    dict(n_kv_heads=2, mlp="relu2"),
    dict(n_kv_heads=1, mlp="gelu", tie_embeddings=False, qk_norm=True),
    dict(block="parallel", head_dim=8, mlp_hidden=100),
    dict(n_heads=8, n_kv_heads=4, logit_softcap=10.0, n_layers=3),
]


@pytest.mark.parametrize("kw", CONFIGS)
def test_param_counts_match_module(tiny, kw):
    cfg = tiny(**kw)
    model = build_model(cfg)
    counts = param_counts(cfg)
    assert counts["total"] == model.num_params()
    assert counts["non_embedding"] == model.num_params(non_embedding=True)
    assert counts["embedding"] + counts["non_embedding"] == counts["total"]


def test_param_counts_for_presets():
    cfg = ModelConfig(preset="llama-124m", vocab_size=32768)
    counts = param_counts(cfg)
    assert 100e6 < counts["total"] < 140e6


@pytest.mark.parametrize("kw", CONFIGS[::2] + [CONFIGS[3]])
def test_flops_match_flop_counter(tiny, kw):
    """Forward and forward+backward matmul FLOPs equal what torch's FlopCounterMode sees.

    The math SDPA backend is used for counting: FlopCounterMode has no formula for the CPU
    flash kernel, and the math path computes exactly the full T×T products flops.py counts.
    """
    cfg = tiny(**kw)
    model = build_model(cfg)
    b, t = 2, 24
    idx = torch.randint(0, 256, (b, t))
    with sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as fwd, torch.no_grad():
            model(idx)
        with FlopCounterMode(display=False) as train:
            model(idx, idx).backward()
    expected = flops_per_token(cfg, t)
    assert fwd.get_total_flops() == pytest.approx(expected["forward"] * b * t, rel=0.02)
    assert train.get_total_flops() == pytest.approx(expected["training"] * b * t, rel=0.02)
    assert expected["training"] == 3 * expected["forward"]


def test_flops_scale_with_context(tiny):
    cfg = tiny()
    a, b = flops_per_token(cfg, 100)["forward"], flops_per_token(cfg, 200)["forward"]
    assert b - a == cfg.n_layers * 4 * 100 * cfg.dim_head * cfg.n_heads


def test_errors(tiny):
    with pytest.raises(SpudError, match="vocab_size"):
        param_counts(ModelConfig(d_model=32, n_layers=1, n_heads=2))
    with pytest.raises(SpudError, match="seq_len"):
        flops_per_token(tiny(), 0)


@pytest.mark.parametrize("kw", [dict(), dict(n_kv_heads=1, mlp="gelu", tie_embeddings=False),
                                dict(block="parallel", head_dim=8, mlp_hidden=100)])
def test_flops_closed_form(tiny, kw):
    """The convention written out for the built-in blocks: per layer 2·(projection weights) +
    4·T·head_dim·n_heads, plus 2·d·V for the LM head; training = 3 × forward."""
    cfg = tiny(**kw)
    d, hd, t = cfg.d_model, cfg.dim_head, 40
    proj = d * (cfg.n_heads + 2 * cfg.kv_heads) * hd + cfg.n_heads * hd * d
    proj += (3 if cfg.mlp == "swiglu" else 2) * d * cfg.hidden
    fwd = cfg.n_layers * (2 * proj + 4 * t * hd * cfg.n_heads) + 2 * d * cfg.vocab_size
    assert flops_per_token(cfg, t) == {"forward": fwd, "training": 3 * fwd}


def test_counts_of_a_block_that_varies_by_layer(tiny):
    """Without layer_key every layer's block is built for counting, so per-layer shapes count."""
    from torch import nn

    from spud.model.layers import ResidualLinear
    from spud.model.registry import BLOCKS, register_block

    @register_block("_test_growing")
    class Growing(nn.Module):
        def __init__(self, cfg, layer_idx):
            super().__init__()
            self.up = nn.Linear(cfg.d_model, 16 * (layer_idx + 1), bias=False)
            self.down = ResidualLinear(16 * (layer_idx + 1), cfg.d_model, bias=False)

        def forward(self, x, rotary, kv_cache=None, layer=0):
            return x + self.down(torch.relu(self.up(x)))

    try:
        cfg = tiny(block="_test_growing", n_layers=3)
        model = build_model(cfg)
        assert param_counts(cfg)["total"] == model.num_params()
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            model(torch.randint(0, 256, (1, 10)))
        assert fc.get_total_flops() == flops_per_token(cfg, 10)["forward"] * 10
    finally:
        BLOCKS.pop("_test_growing", None)
