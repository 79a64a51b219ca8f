"""Architecture options (docs/architecture.md): each one keeps cached decoding, slot decoding
(the serving engine's cache) and the engine's greedy output equal to the full forward pass, and
its parameter/FLOP counts exact against the module and torch's FlopCounterMode."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from spud.config import ModelConfig, TokenizerConfig
from spud.model.flops import flops_per_token, param_counts
from spud.model.registry import build_model

OPTIONS = {
    "zero_init": dict(zero_init_residual=True),
    "x0_mix": dict(x0_mix=True),
    "value_embeds": dict(value_embeds=1, n_kv_heads=2),
    "unet_skips": dict(unet_skips=True, n_layers=3),
    "local_global": dict(attn_pattern="LG", attn_window=5),
    "local_parallel": dict(attn_pattern="L", attn_window=4, block="parallel"),
    "moe": dict(moe_experts=4, moe_top_k=2, mlp_hidden=48),
    "moe_top1_relu2": dict(moe_experts=3, moe_top_k=1, mlp="relu2"),
    "mtp": dict(mtp_depth=2),
    "all": dict(zero_init_residual=True, x0_mix=True, value_embeds=1, unet_skips=True, n_layers=3,
                attn_pattern="LLG", attn_window=6, moe_experts=3, mlp_hidden=40, mtp_depth=1,
                n_kv_heads=2),
}


def make(tiny, name: str, **kw) -> torch.nn.Module:
    """The option's model with every parameter perturbed: zero-initialised projections and
    (1, 0)-initialised mixing weights would otherwise hide the option's code path."""
    torch.manual_seed(0)
    model = build_model(tiny(**{**OPTIONS[name], **kw}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("name", OPTIONS)
def test_kv_cache_decoding_equals_full_forward(tiny, name):
    model = make(tiny, name)
    idx = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        full = model(idx)
        cache = model.new_kv_cache(2, 20)
        steps = [model(idx[:, :7], kv_cache=cache), model(idx[:, 7:10], kv_cache=cache)]
        steps += [model(idx[:, t : t + 1], kv_cache=cache) for t in range(10, 20)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", OPTIONS)
def test_slot_decoding_equals_full_forward(tiny, name):
    """Rows of different lengths in non-contiguous slots over stale cache contents."""
    model = make(tiny, name)
    seqs = [torch.randint(0, 256, (n,)) for n in (9, 14, 4)]
    slots = [2, 0, 3]
    with torch.no_grad():
        cache = model.new_slot_cache(4, 32)
        model.forward_slots(torch.randint(0, 256, (1, 20)), cache, [2], [0])  # stale garbage
        got = [[model.logits(model.forward_slots(s[None, :-3], cache, [sl], [0]))[0]]
               for s, sl in zip(seqs, slots)]
        for j in range(3):
            x = torch.stack([s[len(s) - 3 + j] for s in seqs])[:, None]
            h = model.forward_slots(x, cache, slots, [len(s) - 3 + j for s in seqs])
            for i, row in enumerate(model.logits(h)):
                got[i].append(row)
        for s, g in zip(seqs, got):
            torch.testing.assert_close(torch.cat(g), model(s[None])[0], atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def tok():
    from spud.tokenizer import train_tokenizer

    texts = ["the quick brown fox jumps over the lazy dog 0123456789 " * 4] * 10
    return train_tokenizer(iter(texts), TokenizerConfig(vocab_size=300, min_frequency=1))


@pytest.mark.parametrize("name", OPTIONS)
def test_engine_greedy_equals_full_forward_greedy(tiny, tok, name):
    """The serving engine (continuous batching, slot cache, per-row masks) generates exactly
    what argmax over repeated full forwards generates, for several concurrent requests."""
    from spud.serve.engine import Engine, SamplingParams

    model = make(tiny, name, vocab_size=tok.vocab_size, init_std=0.3)
    prompts = [[(7 * i + 3 * j) % tok.vocab_size for j in range(n)] for i, n in enumerate((5, 11, 8))]
    engine = Engine(model, tok, max_batch=4)
    engine.start()
    try:
        handles = [engine.submit(p, SamplingParams(temperature=0, max_tokens=9, ignore_eos=True))
                   for p in prompts]
        got = [[e.token_id for e in h.result()[1]] for h in handles]
    finally:
        engine.shutdown(abort=True)
    for p, out in zip(prompts, got):
        seq = list(p)
        with torch.no_grad():
            for _ in range(9):
                seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
        assert out == seq[len(p):]


@pytest.mark.parametrize("name", OPTIONS)
def test_counts_match_module_and_flop_counter(tiny, name):
    cfg = tiny(**OPTIONS[name])
    model = build_model(cfg)
    counts = param_counts(cfg)
    assert counts["total"] == model.num_params() == sum(p.numel() for p in model.parameters())
    assert counts["non_embedding"] == model.num_params(non_embedding=True)
    b, t = 2, 24
    idx, tgt = torch.randint(0, 256, (2, b, t))
    with sdpa_kernel(SDPBackend.MATH):
        model.eval()
        with FlopCounterMode(display=False) as fwd, torch.no_grad():
            model(idx)
        model.train()
        with FlopCounterMode(display=False) as train:
            model(idx, tgt).backward()
    expected = flops_per_token(cfg, t)
    assert fwd.get_total_flops() == expected["forward"] * b * t
    assert train.get_total_flops() == pytest.approx(expected["training"] * b * t, rel=1e-6)


def test_default_weight_names_unchanged_and_options_only_add(tiny):
    """Checkpoints and the HF export rely on the default's names; options add, never rename."""
    llama = {
        "embed.weight", "norm.weight", "lm_head.weight", "blocks.0.attn_norm.weight",
        "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight", "blocks.0.mlp_norm.weight",
        "blocks.0.mlp.gate_up.weight", "blocks.0.mlp.down.weight",
    }
    assert set(build_model(tiny(n_layers=1, qk_norm=False)).state_dict()) == llama
    # the default (QK-norm on) adds exactly the two per-head gains
    assert set(build_model(tiny(n_layers=1)).state_dict()) == llama | {
        "blocks.0.attn.q_norm.weight", "blocks.0.attn.k_norm.weight"}
    base3 = set(build_model(tiny(n_layers=3)).state_dict())
    added = {
        "x0_mix": {"resid_lambdas", "x0_lambdas"},
        "unet_skips": {"skip_weights"},
        "value_embeds": {"value_embeds.0.weight", "ve_lambdas"},
        "zero_init": set(),
        "local_global": set(),
    }
    for name, new in added.items():
        names = set(build_model(tiny(**{**OPTIONS[name], "n_layers": 3})).state_dict())
        assert names - base3 == new, name
        assert base3 <= names
    moe = set(build_model(tiny(**OPTIONS["moe"])).state_dict())
    assert "blocks.0.mlp.router.weight" in moe and "blocks.1.mlp.experts.3.down.weight" in moe
    mtp = set(build_model(tiny(**OPTIONS["mtp"])).state_dict())
    assert {n for n in mtp if not n.startswith("mtp.")} == set(build_model(tiny()).state_dict())


def test_zero_init_residual_starts_as_identity_and_learns(tiny):
    model = build_model(tiny(zero_init_residual=True))
    outs = [model.blocks[i].attn.proj.weight for i in range(2)] + [model.blocks[i].mlp.down.weight for i in range(2)]
    assert all(torch.all(w == 0) for w in outs)
    assert model.blocks[0].attn.qkv.weight.std() > 0.01
    idx = torch.randint(0, 256, (2, 16))
    h = model.hidden_states(idx)
    torch.testing.assert_close(h, model.norm(model.embed(idx)))  # every block is the identity
    model(idx, idx).backward()
    assert all(w.grad.abs().sum() > 0 for w in outs)


def test_local_attention_sees_only_its_window(tiny):
    """Changing a token further back than the window changes nothing in a local-only model, and
    changes the output of a global one."""
    idx = torch.randint(0, 256, (1, 16))
    idx2 = idx.clone()
    idx2[0, 2] = (idx[0, 2] + 1) % 256
    local = make(tiny, "local_parallel", n_layers=1)  # window 4: position 2 is out of 6's view
    glob = make(tiny, "local_parallel", n_layers=1, attn_pattern="G")
    with torch.no_grad():
        a, b = local(idx), local(idx2)
        torch.testing.assert_close(a[0, 6:], b[0, 6:])
        assert not torch.allclose(a[0, 2:6], b[0, 2:6])
        assert not torch.allclose(glob(idx)[0, 6:], glob(idx2)[0, 6:])
    assert [tiny(attn_pattern="llg", n_layers=5).window_at(i) for i in range(5)] == [128, 128, None, 128, 128]


def test_moe_objective_balancing_and_expert_counts(tiny):
    cfg = tiny(**OPTIONS["moe"])
    model = build_model(cfg)
    idx, tgt = torch.randint(0, 256, (2, 2, 12))
    objective = model(idx, tgt)
    stats = model.train_stats()
    assert model.train_stats() == {}  # read once
    aux = torch.stack([m.aux_loss for m in model.moe_layers]).mean()
    torch.testing.assert_close(objective, torch.tensor(stats["lm_loss"]) + 0.01 * aux)
    assert stats["moe_aux_loss"] == pytest.approx(aux.item())
    assert len(stats["expert_tokens"]) == 2  # layers
    assert all(sum(row) == 2 * 12 * 2 for row in stats["expert_tokens"])  # B·T·top_k
    model.eval()
    torch.testing.assert_close(model(idx, tgt), torch.tensor(stats["lm_loss"]))  # eval: LM loss only
    # Aux-loss-driven balancing: the balancing gradient reaches the router.
    model.train()
    model.zero_grad()
    model(idx)  # sets aux_loss without the LM loss
    torch.stack([m.aux_loss for m in model.moe_layers]).sum().backward()
    assert model.blocks[0].mlp.router.weight.grad.abs().sum() > 0


def test_mtp_is_training_only(tiny):
    model = build_model(tiny(**OPTIONS["mtp"]))
    idx, tgt = torch.randint(0, 256, (2, 2, 12))
    tgt[0, :3] = -1
    objective = model(idx, tgt)
    stats = model.train_stats()
    torch.testing.assert_close(objective, torch.tensor(stats["lm_loss"] + 0.3 * stats["mtp_loss"]))
    objective.backward()
    assert model.mtp[1].proj.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        before = model(idx)
        for p in model.mtp.parameters():
            p.add_(1.0)  # the heads never touch inference
        torch.testing.assert_close(model(idx), before)
        torch.testing.assert_close(model(idx, tgt), torch.tensor(stats["lm_loss"]))
    assert flops_per_token(model.cfg, 12)["forward"] == flops_per_token(tiny(), 12)["forward"]


def test_option_validation_errors():
    from spud.config import validate_config
    from spud.errors import SpudError

    for bad, msg in [({"attn_pattern": "LXG"}, "attn_pattern"), ({"moe_experts": 2, "moe_top_k": 3}, "moe_top_k"),
                     ({"value_embeds": 3, "n_layers": 4}, "value_embeds")]:
        with pytest.raises(SpudError, match=msg):
            validate_config({"model": bad})


def test_arch_options_lists_only_what_is_on():
    assert ModelConfig().arch_options() == {}
    cfg = ModelConfig(attn_pattern="LG", moe_experts=4, x0_mix=True)
    assert cfg.arch_options() == {"x0_mix": True, "attn_pattern": "LG", "attn_window": 128, "moe_experts": 4,
                                  "moe_top_k": 2, "moe_aux_loss": 0.01}


def test_info_lists_every_choice_and_option():
    from rich.console import Console

    from spud.info import options_table
    from spud.model.registry import choices

    console = Console(record=True, width=300)
    console.print(options_table())
    text = console.export_text()
    names = list(ModelConfig.model_fields)
    for name in (*names[names.index("init_std") + 1 :], "qk_norm", "logit_softcap", *choices("block"),
                 *choices("mlp")):
        assert name in text, name


@pytest.mark.parametrize("name", ["moe", "mtp", "all"])
def test_eval_loss_is_the_next_token_loss(tiny, name):
    """What `spud eval` and validation read: per-token losses equal cross-entropy of the logits."""
    model = make(tiny, name)
    idx, tgt = torch.randint(0, 256, (2, 2, 12))
    with torch.no_grad():
        ref = torch.nn.functional.cross_entropy(model(idx).flatten(0, 1), tgt.flatten(), reduction="none")
        torch.testing.assert_close(model.per_token_loss(idx, tgt).flatten(), ref, atol=1e-5, rtol=1e-5)


def test_all_options_under_bf16_autocast_and_activation_checkpointing(tiny):
    from spud.train.distributed import apply_activation_checkpointing

    model = make(tiny, "all").train()
    idx, tgt = torch.randint(0, 256, (2, 2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(idx, tgt)
        loss.backward()
        model.eval()
        with torch.no_grad():
            cache = model.new_kv_cache(2)
            steps = [model(idx[:, :6], kv_cache=cache)] + [model(idx[:, t : t + 1], kv_cache=cache)
                                                           for t in range(6, 16)]
            full = model(idx)
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())
    torch.testing.assert_close(torch.cat(steps, 1).float(), full.float(), atol=0.1, rtol=0)
    # Recomputing blocks in backward (train.activation_checkpointing) changes nothing.
    model.train()
    model.zero_grad()
    ref = model(idx, tgt)
    ref.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    apply_activation_checkpointing(model)
    again = model(idx, tgt)
    again.backward()
    torch.testing.assert_close(again, ref)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, g)
