import math

import pytest
import torch
import torch.nn.functional as F

from spud.config import ModelConfig
from spud.errors import SpudError
from spud.model.layers import ResidualLinear
from spud.model.registry import build_model
from spud.model.transformer import KVCache, Transformer

VARIANTS = {
    "mha": {},
    "gqa": dict(n_kv_heads=2),
    "mqa": dict(n_kv_heads=1),
    "qk_norm": dict(qk_norm=True, n_kv_heads=2),
    "softcap": dict(logit_softcap=3.0, tie_embeddings=False),
    "parallel": dict(block="parallel", mlp="relu2"),
    "gelu_head_dim": dict(mlp="gelu", head_dim=8),
}


def test_vocab_size_required():
    with pytest.raises(SpudError, match="vocab_size"):
        Transformer(ModelConfig(d_model=32, n_layers=1, n_heads=2))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_kv_cache_decoding_equals_full_forward(tiny, name):
    """Prefill + one-token steps through the cache reproduce the full forward's logits."""
    model = build_model(tiny(**VARIANTS[name])).eval()
    idx = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        full = model(idx)
        cache = model.new_kv_cache(2, 20)
        steps = [model(idx[:, :7], kv_cache=cache)]
        steps += [model(idx[:, t : t + 1], kv_cache=cache) for t in range(7, 20)]
    assert cache.pos == 20
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)


def test_kv_cache_chunked_prefill_and_reset(tiny):
    model = build_model(tiny(n_kv_heads=2)).eval()
    idx = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        full = model(idx)
        cache = model.new_kv_cache(1)
        parts = [model(idx[:, a:b], kv_cache=cache) for a, b in ((0, 5), (5, 11), (11, 16))]
        torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=0)
        cache.reset()
        torch.testing.assert_close(model(idx[:, :4], kv_cache=cache), full[:, :4], atol=1e-5,
                                   rtol=0)


def test_kv_cache_errors(tiny):
    model = build_model(tiny()).eval()
    cache = model.new_kv_cache(1, 8)
    assert isinstance(cache, KVCache) and cache.k[0].shape == (1, 4, 8, 16)
    with pytest.raises(SpudError, match="full"):
        model(torch.zeros(1, 9, dtype=torch.long), kv_cache=cache)
    with pytest.raises(SpudError, match="batch size"):
        model(torch.zeros(2, 1, dtype=torch.long), kv_cache=cache)
    with pytest.raises(SpudError, match="max_seq_len"):
        model.new_kv_cache(1, 1000)


@pytest.mark.parametrize("name", ["mha", "softcap", "qk_norm"])
def test_fused_loss_equals_reference_loss_and_grads(tiny, name):
    model = build_model(tiny(**VARIANTS[name]))
    idx = torch.randint(0, 256, (2, 16))
    tgt = torch.randint(0, 256, (2, 16))
    tgt[0, :4] = -1
    results = []
    for fused in (True, False):
        model.fused_loss = fused
        model.zero_grad()
        loss = model(idx, tgt)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (l1, g1), (l2, g2) = results
    torch.testing.assert_close(l1, l2)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-4)
    logits = model(idx).detach()
    ref = F.cross_entropy(logits.view(-1, 256), tgt.view(-1), ignore_index=-1)
    torch.testing.assert_close(l1, ref)


def test_per_token_loss(tiny):
    model = build_model(tiny())
    idx = torch.randint(0, 256, (2, 12))
    tgt = torch.randint(0, 256, (2, 12))
    per = model.per_token_loss(idx, tgt)
    assert per.shape == (2, 12) and per.dtype == torch.float32
    torch.testing.assert_close(per.mean(), model(idx, tgt))
    torch.testing.assert_close(per, model(idx, tgt, return_per_token_loss=True))
    tgt[1, 3] = -1
    assert model.per_token_loss(idx, tgt)[1, 3] == 0
    with pytest.raises(SpudError, match="targets shape"):
        model(idx, tgt[:, :5])


def test_initial_loss_is_near_uniform(tiny):
    model = build_model(tiny())
    idx, tgt = torch.randint(0, 256, (2, 4, 32))
    assert abs(model(idx, tgt).item() - math.log(256)) < 0.1


def test_init_statistics_and_tying(tiny):
    cfg = tiny(n_layers=8, d_model=128, init_std=0.02, tie_embeddings=True)
    model = build_model(cfg)
    assert model.lm_head.weight is model.embed.weight
    out_std = 0.02 / math.sqrt(2 * 8)
    residual = [m for m in model.modules() if isinstance(m, ResidualLinear)]
    assert len(residual) == 2 * 8
    assert abs(torch.cat([m.weight.flatten() for m in residual]).std() - out_std) < 0.1 * out_std
    assert abs(model.blocks[0].attn.qkv.weight.std() - 0.02) < 0.002
    assert all(torch.all(p == 1) for n, p in model.named_parameters() if "norm" in n)
    assert not any("bias" in n for n, _ in model.named_parameters())
    untied = build_model(tiny())  # the default
    assert untied.lm_head.weight is not untied.embed.weight
    assert abs(untied.lm_head.weight.std() - 0.02) < 0.002


def test_num_params(tiny):
    model = build_model(tiny(tie_embeddings=True))
    assert model.num_params() == sum(p.numel() for p in model.parameters())
    assert model.num_params() - model.num_params(non_embedding=True) == 256 * 64
    untied = build_model(tiny())  # the default
    assert untied.num_params() - untied.num_params(non_embedding=True) == 2 * 256 * 64
    assert untied.num_params(non_embedding=True) == model.num_params(non_embedding=True)


def test_dropout_only_in_training(tiny):
    model = build_model(tiny(dropout=0.5))
    idx = torch.randint(0, 256, (1, 8))
    model.eval()
    torch.testing.assert_close(model(idx), model(idx))
    model.train()
    assert not torch.allclose(model(idx), model(idx))


def test_training_reduces_loss(tiny):
    model = build_model(tiny(n_kv_heads=2))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    idx = torch.randint(0, 256, (4, 32))
    first = None
    for _ in range(15):
        loss = model(idx[:, :-1], idx[:, 1:])
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < first - 1.0


def test_bf16_autocast_loss_and_cached_decoding(tiny):
    model = build_model(tiny(n_kv_heads=2))
    idx, tgt = torch.randint(0, 256, (2, 2, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = model(idx, tgt)
        model.fused_loss = False
        ref = model(idx, tgt)
        fused.backward()
        model.eval()
        with torch.no_grad():
            cache = model.new_kv_cache(2)  # fp32 cache, bf16 activations
            steps = [model(idx[:, :6], kv_cache=cache)]
            steps += [model(idx[:, t : t + 1], kv_cache=cache) for t in range(6, 12)]
            full = model(idx)
    assert fused.dtype == torch.float32 and abs(fused.item() - ref.item()) < 2e-2
    assert model.embed.weight.grad.dtype == torch.float32
    torch.testing.assert_close(torch.cat(steps, 1).float(), full.float(), atol=0.1, rtol=0)
