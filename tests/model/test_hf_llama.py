"""Spud's llama block is weight-compatible with Hugging Face LlamaForCausalLM."""

import pytest
import torch

from spud.errors import SpudError
from spud.model.registry import build_model
from spud.model.transformer import hf_llama_config, to_hf_llama_state_dict

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("kw", [dict(), dict(n_kv_heads=2, tie_embeddings=False, rope_theta=500.0)])
def test_hf_llama_logits_equal_spud_logits(tiny, kw):
    cfg = tiny(**kw)
    model = build_model(cfg).eval()
    hf_cfg = transformers.LlamaConfig(**hf_llama_config(cfg), attn_implementation="sdpa")
    peer = transformers.LlamaForCausalLM(hf_cfg).eval()
    missing, unexpected = peer.load_state_dict(to_hf_llama_state_dict(model), strict=True)
    assert not missing and not unexpected
    idx = torch.randint(0, cfg.vocab_size, (2, 19))
    with torch.no_grad():
        torch.testing.assert_close(peer(input_ids=idx).logits, model(idx), atol=1e-4, rtol=0)


@pytest.mark.parametrize("kw", [dict(mlp="gelu"), dict(qk_norm=True), dict(block="parallel"),
                                dict(logit_softcap=5.0)])
def test_non_llama_configs_refuse_export(tiny, kw):
    with pytest.raises(SpudError, match="Hugging Face Llama"):
        to_hf_llama_state_dict(build_model(tiny(**kw)))
