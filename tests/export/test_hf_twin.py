"""The in-memory Hugging Face twin the benchmarks time against: the class `spud export hf` writes,
holding the same weights, computing the same function (default recipe = Qwen3, and the others)."""

import pytest
import torch

from spud.config import ModelConfig
from spud.errors import SpudError
from spud.export.peer import hf_twin
from spud.model.registry import build_model

pytest.importorskip("transformers")


@pytest.mark.parametrize("kw,hf_class", [
    ({}, "Qwen3ForCausalLM"),  # the default recipe: SwiGLU + QK-norm
    ({"qk_norm": False, "n_kv_heads": 2, "tie_embeddings": False, "rope_theta": 500.0}, "LlamaForCausalLM"),
    ({"qk_norm": False, "mlp": "relu2"}, "ArceeForCausalLM"),
])
def test_twin_logits_equal_spud_logits(kw, hf_class):
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=64, n_layers=2, n_heads=4, vocab_size=300, max_seq_len=64, init_std=0.3, **kw)
    model = build_model(cfg).eval()
    peer = hf_twin(model, attn_implementation="sdpa")
    assert type(peer).__name__ == hf_class and peer.config._attn_implementation == "sdpa"
    idx = torch.randint(0, cfg.vocab_size, (2, 19))
    with torch.no_grad():
        torch.testing.assert_close(peer(input_ids=idx).logits, model(idx), atol=1e-4, rtol=0)


@pytest.mark.parametrize("kw", [dict(block="parallel"), dict(logit_softcap=5.0)])
def test_inexpressible_configs_are_refused(kw):
    model = build_model(ModelConfig(d_model=32, n_layers=1, n_heads=4, vocab_size=100, **kw))
    with pytest.raises(SpudError, match="closest exportable"):
        hf_twin(model)
