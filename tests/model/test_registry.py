import pytest
import torch
from torch import nn

from spud.config import validate_config
from spud.errors import SpudError
from spud.model.blocks.llama import LlamaBlock
from spud.model.blocks.parallel import ParallelBlock
from spud.model.layers import ResidualLinear
from spud.model.registry import BLOCKS, build_model, choices, get_block, register_block
from spud.model.transformer import Transformer


def test_builtin_blocks():
    assert {"llama", "parallel"} <= set(BLOCKS)
    assert get_block("llama") is LlamaBlock


@pytest.mark.parametrize("field,typo,right", [("block", "lama", "llama"), ("mlp", "swiglo", "swiglu")])
def test_unknown_choice_lists_known_ones(field, typo, right):
    """Choices come from the registry, and a typo fails at config load with a hint."""
    with pytest.raises(SpudError) as e:
        validate_config({"model": {field: typo}})
    msg = str(e.value)
    assert f"model.{field}" in msg and f"'{typo}'" in msg and f"did you mean '{right}'" in msg
    for name in choices(field):
        assert name in msg


def test_parallel_block_shares_one_norm(tiny):
    model = build_model(tiny(block="parallel"))
    assert isinstance(model, Transformer)
    blk = model.blocks[0]
    assert isinstance(blk, ParallelBlock)
    assert sum(isinstance(m, nn.Module) and type(m).__name__ == "RMSNorm"
               for m in blk.children()) == 1
    idx = torch.randint(0, 256, (2, 10))
    model(idx, idx).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_registering_a_new_block_is_one_entry(tiny):
    @register_block("_test_mlp_only")
    class MLPOnly(nn.Module):
        def __init__(self, cfg, layer_idx):
            super().__init__()
            self.up = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
            self.out = ResidualLinear(cfg.d_model, cfg.d_model, bias=False)

        def forward(self, x, rotary, kv_cache=None, layer=0):
            return x + self.out(torch.relu(self.up(x)))

    try:
        model = build_model(tiny(block="_test_mlp_only"))
        assert model(torch.randint(0, 256, (1, 5))).shape == (1, 5, 256)
        # the shared init found the tagged residual projection: std 0.02/sqrt(2·2 layers)
        assert abs(model.blocks[0].out.weight.std().item() - 0.01) < 0.0015
        assert abs(model.blocks[0].up.weight.std().item() - 0.02) < 0.003
        with pytest.raises(SpudError, match="already registered"):
            register_block("_test_mlp_only")(nn.Identity)
    finally:
        BLOCKS.pop("_test_mlp_only", None)
