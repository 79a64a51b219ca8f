"""Memory estimates against hand-computed figures for a tiny config."""

import pytest
import torch

from spud.config import ModelConfig, TrainConfig
from spud.model.flops import muon_param_count
from spud.model.registry import build_model
from spud.train.optim import build_optimizer
from spud.model.memory import (
    activation_bytes,
    kv_cache_bytes,
    suggest_parallelism,
    training_memory,
)

CFG = ModelConfig(d_model=64, n_layers=2, n_heads=4, vocab_size=512, max_seq_len=32, qk_norm=False,
                  tie_embeddings=True)
# swiglu hidden = round_up(int(8·64/3) = 170, 64) = 192; head_dim 16, MHA.
# per layer: qkv 64·(4+2·4)·16 = 12288, out 4·16·64 = 4096, mlp 3·64·192 = 36864, norms 128
PER_LAYER = 12288 + 4096 + 36864 + 128
TOTAL = 2 * PER_LAYER + 64 + 512 * 64  # + final norm + tied embedding


def test_model_state_bf16_and_fsdp():
    m = training_memory(CFG, 1, 32, "bf16")
    assert m.weights == 2 * TOTAL and m.gradients == 2 * TOTAL
    assert m.optimizer == 12 * TOTAL  # fp32 master + two fp32 moments
    half = training_memory(CFG, 1, 32, "bf16", fsdp=2)
    assert half.weights + half.gradients + half.optimizer == 8 * TOTAL
    fp32 = training_memory(CFG, 1, 32, "fp32")
    assert (fp32.weights, fp32.gradients, fp32.optimizer) == (4 * TOTAL, 4 * TOTAL, 8 * TOTAL)


def test_activations_with_and_without_checkpointing():
    tokens = 2 * 32  # micro-batch 2 × seq 32, bf16 (2 bytes)
    layer = 2 * tokens * (6 * 64 + 2 * 64 + 3 * 192) + 4 * tokens * 4  # + fp32 LSE per head
    head = tokens * (2 * 64 + (2 + 4) * 512)
    assert activation_bytes(CFG, 2, 32) == 2 * layer + head == 485376
    ckpt = 2 * (2 * tokens * 64) + layer + head
    assert activation_bytes(CFG, 2, 32, checkpointing=True) == ckpt == 361472


def test_kv_cache():
    # layers · 2 · kv_heads · head_dim · bytes · tokens
    assert kv_cache_bytes(CFG, 100) == 2 * 2 * 4 * 16 * 2 * 100
    gqa = CFG.model_copy(update={"n_kv_heads": 1})
    assert kv_cache_bytes(gqa, 100) == kv_cache_bytes(CFG, 100) / 4


def test_parallelism_prefers_ddp_then_fsdp():
    assert suggest_parallelism(CFG, 32, 8, 80e9).strategy == "DDP"
    need = 16 * TOTAL
    p = suggest_parallelism(CFG, 32, 8, need / 0.9 / 3)  # state alone needs ~3 devices' memory
    assert p.strategy == "FSDP" and p.fsdp == 4
    assert suggest_parallelism(CFG, 32, 2, need / 0.9 / 3).strategy == "does not fit"


@pytest.mark.parametrize("optimizer, model", [("adamw", {}), ("muon", {}),
                                              ("muon", {"moe_experts": 4, "moe_top_k": 2, "value_embeds": 1,
                                                        "n_layers": 4, "tie_embeddings": False})])
def test_optimizer_state_estimate_equals_the_real_optimizer_after_a_step(optimizer, model):
    # The estimate (fp32: no master copy) must equal the bytes of every state tensor the real
    # optimizer holds after one step; Muon keeps one buffer per block matrix, AdamW two moments.
    cfg = CFG.model_copy(update=model)
    cfg = ModelConfig.model_validate(cfg.model_dump())
    torch.manual_seed(0)
    net = build_model(cfg)
    opt = build_optimizer(net, TrainConfig(optimizer=optimizer), torch.device("cpu"))
    net(torch.randint(0, cfg.vocab_size, (2, 16)), torch.randint(0, cfg.vocab_size, (2, 16))).backward()
    opt.step()
    real = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
               if isinstance(t, torch.Tensor) and t.dim() > 0)
    assert training_memory(cfg, 1, 16, "fp32", optimizer=optimizer).optimizer == real
    if optimizer == "muon":  # and it is less than AdamW's by 4 bytes per Muon parameter
        adamw = training_memory(cfg, 1, 16, "fp32").optimizer
        assert adamw - real == 4 * muon_param_count(cfg) > 0
