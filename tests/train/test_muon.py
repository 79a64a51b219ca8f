"""Muon (train.optimizer=muon): the orthogonalisation it promises, which parameters it takes, its
schedule, and training as a user runs it (exact resume, skipped non-finite steps, accumulation).
1-rank vs 2-rank equivalence and resharding are in test_muon_dist.py."""

import math
import shutil

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from spud.errors import SpudError
from spud.model.registry import build_model
from spud.train.metrics import read_metrics
from spud.train.optim import (
    MuonAdamW,
    apply_schedule,
    build_optimizer,
    muon_momentum_at,
    muon_update,
    muon_updates,
    param_roles,
    polar_factor,
)
from spud.train.trainer import Trainer

# What 5 Polar Express iterations guarantee (exact arithmetic, from the scalar polynomials) for
# every singular value >= 1e-3 of the Frobenius norm, widened by 5e-3 for fp32 rounding.
BAND = (0.853 - 5e-3, 1.141 + 5e-3)


def conditioned(m: int, n: int, seed: int, smallest: float = 1e-2) -> torch.Tensor:
    """A random m×n matrix whose singular values are log-uniform in [smallest, 1]."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=g))
    s = torch.exp(torch.rand(k, generator=g) * math.log(smallest))
    s[0], s[-1] = 1.0, smallest
    return u @ torch.diag(s) @ v.T


SHAPES = [(64, 64), (48, 160), (160, 48), (3, 32, 96)]  # square, wide, tall, a batch of 3


@pytest.mark.parametrize("shape", SHAPES)
def test_polar_factor_singular_values_are_near_one(shape):
    *batch, m, n = shape
    g = torch.stack([conditioned(m, n, seed=i) for i in range(batch[0] if batch else 1)])
    ratio = torch.linalg.svdvals(g).min() / g.norm(dim=(-2, -1)).max()
    assert ratio >= 1e-3  # inside the promise's precondition
    sv = torch.linalg.svdvals(polar_factor(g.reshape(shape), steps=5))
    assert BAND[0] <= sv.min() and sv.max() <= BAND[1], (sv.min().item(), sv.max().item())
    # past 5 iterations the classical quintic converges to exactly 1
    sv8 = torch.linalg.svdvals(polar_factor(g.reshape(shape), steps=8))
    assert (sv8 - 1).abs().max() < 1e-3


def test_zero_iterations_are_not_orthogonal():
    """Negative control: the band test must fail without the iteration (only the normalisation)."""
    sv = torch.linalg.svdvals(polar_factor(conditioned(64, 64, seed=0), steps=0))
    assert sv.min() < BAND[0] and sv.max() < BAND[0]


def test_gaussian_gradient_of_a_rectangular_matrix():
    """A plain random (well-conditioned, rectangular) matrix: all singular values in the band."""
    g = torch.randn(128, 512, generator=torch.Generator().manual_seed(0))
    sv = torch.linalg.svdvals(polar_factor(g))
    assert BAND[0] <= sv.min() and sv.max() <= BAND[1]


def test_fused_rows_are_orthogonalised_separately_and_scaled_spectrally():
    q, k, v = (conditioned(32, 64, seed=s) for s in range(3))
    fused = torch.cat([q, k[:16], v[:16]])  # a GQA-like q | k | v weight: 32 + 16 + 16 rows
    got = muon_update(fused, 5, [32, 16, 16])
    want = torch.cat([polar_factor(q), polar_factor(k[:16]), polar_factor(v[:16])])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(muon_update(fused, 5), want, atol=1e-2)  # joint ≠ separate
    # a tall piece (fan_out > fan_in) is scaled by sqrt(fan_out / fan_in); a wide one is not
    tall = muon_update(conditioned(256, 64, seed=5), 8)
    assert torch.linalg.svdvals(tall).max().item() == pytest.approx(2.0, rel=1e-3)
    wide = muon_update(conditioned(64, 256, seed=5), 8)
    assert torch.linalg.svdvals(wide).max().item() == pytest.approx(1.0, rel=1e-3)


# ----------------------------------------------------------------------------- which params
def _model(tiny_cfg, **model):
    cfg = tiny_cfg.model_copy(deep=True)
    cfg.model.vocab_size = 512
    for k, val in model.items():
        setattr(cfg.model, k, val)
    cfg.train.optimizer = "muon"
    return cfg, build_model(cfg.model)


def test_param_roles_and_groups(tiny_cfg):
    cfg, model = _model(tiny_cfg, tie_embeddings=False)
    block = model.blocks[0]
    block.value_embed = nn.Embedding(10, cfg.model.d_model)  # 2-D, in a block, but an embedding
    block.experts = nn.Parameter(torch.zeros(4, 8, cfg.model.d_model))  # stacked matrices
    block.mix = nn.Parameter(torch.ones(2))  # a learnable scalar mix
    roles = param_roles(model)
    assert roles["embed.weight"] == "embedding" and roles["blocks.0.value_embed.weight"] == "embedding"
    assert roles["lm_head.weight"] == "head"
    assert roles["blocks.0.experts"] == "matrix" and roles["blocks.0.mix"] == "scalar"
    assert roles["norm.weight"] == "scalar" and roles["blocks.1.attn_norm.weight"] == "scalar"
    linears = {f"blocks.{i}.{n}" for i in range(len(model.blocks))
               for n, m in model.blocks[i].named_modules() if isinstance(m, nn.Linear)}
    muon = {n for n, r in roles.items() if r == "matrix"}
    assert muon == {f"{n}.weight" for n in linears} | {"blocks.0.experts"}
    assert {n for n in muon if "qkv" in n} and {n for n in muon if "gate_up" in n}  # fused ones too

    cfg.train.head_lr, cfg.train.embed_lr = 0.001, 0.006
    opt = build_optimizer(model, cfg.train, torch.device("cpu"))
    assert isinstance(opt, MuonAdamW)
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(groups) == {"muon", "embedding", "head", "scalar"}
    assert sum(len(g["params"]) for g in opt.param_groups) == len(roles)  # each param once
    apply_schedule(opt, cfg.train.lr, 0, cfg.train)  # the peak LR
    assert groups["muon"]["lr"] == pytest.approx(cfg.train.muon_lr)
    assert groups["head"]["lr"] == pytest.approx(0.001) and groups["embedding"]["lr"] == pytest.approx(0.006)
    assert groups["scalar"]["lr"] == cfg.train.lr and groups["head"]["weight_decay"] == cfg.train.weight_decay


def test_tied_embedding_is_adamw_only(tiny_cfg):
    cfg, model = _model(tiny_cfg, tie_embeddings=True)
    roles = param_roles(model)
    assert roles["embed.weight"] == "embedding" and "lm_head.weight" not in roles
    opt = build_optimizer(model, cfg.train, torch.device("cpu"))
    assert [g["name"] for g in opt.param_groups] == ["muon", "embedding", "scalar"]


def test_momentum_warmup(tiny_cfg):
    t = tiny_cfg.train.model_copy(update={"muon_momentum_start": 0.85, "muon_momentum": 0.95,
                                          "muon_momentum_warmup_steps": 100})
    assert [muon_momentum_at(s, t) for s in (0, 50, 100, 1000)] == pytest.approx([0.85, 0.90, 0.95, 0.95])
    assert muon_momentum_at(0, t.model_copy(update={"muon_momentum_warmup_steps": 0})) == 0.95


# ----------------------------------------------------------------------------- training
def muon_cfg(tiny_cfg, **train):
    cfg = tiny_cfg.model_copy(deep=True)
    cfg.train.optimizer = "muon"
    cfg.train.muon_momentum_warmup_steps = 6  # the warm-up is inside the run, so resume must get it
    for k, val in train.items():
        setattr(cfg.train, k, val)
    return cfg


def losses(run):
    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"}


def momentum_buffers(ckpt) -> list[torch.Tensor]:
    state = torch.load(ckpt / "optimizer.pt", weights_only=True)["state"]
    return [s["momentum_buffer"] for s in state.values() if "momentum_buffer" in s]


def test_resume_with_muon_is_exact(tiny_cfg, fresh_run, tmp_path):
    cfg = muon_cfg(tiny_cfg, tokens_per_step=2 * tiny_cfg.train.micro_batch_size * tiny_cfg.model.max_seq_len)
    cfg.model.dropout = 0.1
    straight = tmp_path / "straight"
    shutil.copytree(fresh_run, straight)
    Trainer(cfg, straight).run()
    Trainer(cfg, fresh_run).run()
    for late in ("step_0000008", "step_0000012"):  # as if the run died right after step 4's save
        shutil.rmtree(fresh_run / "checkpoints" / late)
    assert len(momentum_buffers(fresh_run / "checkpoints" / "step_0000004")) == 4 * tiny_cfg.model.n_layers
    Trainer(cfg, fresh_run, resume=True).run()
    assert losses(fresh_run) == losses(straight)  # bit-identical, steps 1..12
    a, b = (load_file(r / "checkpoints" / "step_0000012" / "model.safetensors") for r in (straight, fresh_run))
    assert all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = (momentum_buffers(r / "checkpoints" / "step_0000012") for r in (straight, fresh_run))
    assert all(torch.equal(x, y) for x, y in zip(ma, mb, strict=True))


def test_nonfinite_step_leaves_weights_and_momentum_alone(tiny_cfg, fresh_run):
    cfg = muon_cfg(tiny_cfg, max_steps=4, checkpoint_every=1, keep_checkpoints=10, debug_nan_at_step=[3])
    Trainer(cfg, fresh_run).run()
    ck = fresh_run / "checkpoints"
    m2, m3, m4 = (momentum_buffers(ck / f"step_000000{s}") for s in (2, 3, 4))
    assert all(torch.equal(x, y) for x, y in zip(m2, m3, strict=True))  # skipped: no momentum update
    assert not all(torch.equal(x, y) for x, y in zip(m3, m4, strict=True))
    w2, w3 = (load_file(ck / f"step_000000{s}" / "model.safetensors") for s in (2, 3))
    assert all(torch.equal(w2[k], w3[k]) for k in w2)


def test_gradient_accumulation_matches_one_big_batch(tiny_cfg, fresh_run, tmp_path):
    mb, seq = tiny_cfg.train.micro_batch_size, tiny_cfg.model.max_seq_len
    big = tmp_path / "big"
    shutil.copytree(fresh_run, big)
    Trainer(muon_cfg(tiny_cfg, max_steps=6, micro_batch_size=mb, tokens_per_step=mb * seq), big).run()
    Trainer(muon_cfg(tiny_cfg, max_steps=6, micro_batch_size=mb // 2, tokens_per_step=mb * seq), fresh_run).run()
    a, b = losses(big), losses(fresh_run)
    assert max(abs(a[s] - b[s]) for s in a) < 1e-5


def test_resume_with_another_optimizer_is_refused(tiny_cfg, fresh_run):
    Trainer(muon_cfg(tiny_cfg, max_steps=4), fresh_run).run()
    cfg = tiny_cfg.model_copy(deep=True)
    cfg.train.max_steps, cfg.train.optimizer = 8, "adamw"
    with pytest.raises(SpudError, match="train.optimizer=muon"):
        Trainer(cfg, fresh_run, resume=True)


def test_batching_across_weights_does_not_change_the_update():
    """One process batches all same-shaped matrices (across layers, tall ones transposed); the
    result must be each weight's own update."""
    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(192, 64, generator=g), torch.randn(64, 64, generator=g),
               torch.randn(384, 64, generator=g), torch.randn(64, 192, generator=g),
               torch.randn(2, 8, 64, generator=g)]
    splits = [[64, 64, 64], None, [192, 192], None, None]
    together = muon_updates(weights, splits, 5)
    for w, s, got in zip(weights, splits, together, strict=True):
        torch.testing.assert_close(got, muon_update(w, 5, s), atol=1e-6, rtol=1e-6)
