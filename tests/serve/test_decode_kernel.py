"""The engine's lean CPU decode step (spud.serve.decode_kernel) against the model's own forward:
same logits (float rounding apart), same cache contents, same greedy text, weight updates
followed, and the module path kept for every model it does not re-state."""

from __future__ import annotations

import os
import time

import pytest
import torch

from spud.config import ModelConfig, TokenizerConfig
from spud.model.registry import build_model
from spud.serve.decode_kernel import DecodeKernel
from spud.serve.engine import Engine, SamplingParams
from spud.tokenizer import train_tokenizer

VOCAB = 300


@pytest.fixture(scope="module")
def tok():
    texts = ["the quick brown fox jumps over the lazy dog 0123456789 " * 4, "héllo wörld 日本語"] * 20
    return train_tokenizer(iter(texts), TokenizerConfig(vocab_size=VOCAB, min_frequency=1))


def make_model(**kw):
    torch.manual_seed(0)
    # init_std 0.3: varied, confident outputs (the default init's random model repeats itself)
    base = dict(d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, max_seq_len=96,
                init_std=0.3)
    model = build_model(ModelConfig(**{**base, **kw})).eval()
    with torch.no_grad():  # non-trivial norm gains, so that folding them is really tested
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return model


def assert_close(got, ref):
    """Equal up to float rounding: 1e-5 of the tensor's own scale (folded gains, fused adds and
    another BLAS kernel round differently; one-row vs many-row products already do)."""
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5 * max(1.0, ref.abs().max().item()))


def module_step(model, cache, ids, slots, starts):
    return model.logits(model.forward_slots(ids.view(-1, 1), cache, slots, starts)[:, -1])


def prefilled_caches(model, slots, lengths, seed=1):
    """Two caches holding the same prompts in `slots` (row i: lengths[i] tokens)."""
    g = torch.Generator().manual_seed(seed)
    caches = [model.new_slot_cache(8, 96) for _ in range(2)]
    for slot, n in zip(slots, lengths):
        x = torch.randint(0, VOCAB, (1, n), generator=g)
        for c in caches:
            model.forward_slots(x, c, [slot], [0])
    return caches


CONFIGS = [
    {},  # the default recipe: GQA, QK-norm, SwiGLU, untied head
    dict(n_kv_heads=4, qk_norm=False, tie_embeddings=True),
    dict(n_kv_heads=1, logit_softcap=3.0),
    dict(mlp="relu2"),
    dict(mlp="gelu", tie_embeddings=True),
    dict(attn_pattern="LG", attn_window=8),  # a sliding-window layer that cuts
]


@pytest.mark.parametrize("kw", CONFIGS)
@pytest.mark.parametrize("slots", [[5, 1, 3], [2, 3, 4]], ids=["gathered-slots", "adjacent-slots"])
def test_kernel_logits_and_cache_equal_the_module_forward(kw, slots):
    model = make_model(**kw)
    kernel = DecodeKernel(model)
    # rows at different lengths: per-row positions and masks; slots out of order are gathered,
    # adjacent ones read as one strided view of the cache
    lengths = [17, 9, 30]
    c_mod, c_ker = prefilled_caches(model, slots, lengths)
    ids = torch.tensor([7, 42, 199])
    with torch.inference_mode():
        for step in range(4):
            starts = [n + step for n in lengths]
            ref = module_step(model, c_mod, ids, slots, starts)
            got = kernel.logits(ids, c_ker, slots, starts)
            assert got.shape == ref.shape == (3, VOCAB)
            assert_close(got, ref)
            assert torch.equal(got.argmax(-1), ref.argmax(-1))
            ids = ref.argmax(-1)
    for layer in range(model.cfg.n_layers):
        for a, b in ((c_mod.k[layer], c_ker.k[layer]), (c_mod.v[layer], c_ker.v[layer])):
            assert_close(b, a)


def run(engine, prompts, **kw):
    hs = [engine.submit(p, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, **kw))
          for p in prompts]
    return [[e.token_id for e in h.result()[1]] for h in hs]


def test_engine_greedy_text_is_the_same_with_and_without_the_kernel(tok):
    model = make_model()
    fast, plain = Engine(model, tok, max_batch=8), Engine(model, tok, max_batch=8, decode_kernel=False)
    assert fast._kernel is not None and plain._kernel is None
    prompts = [tok.encode(t) for t in ("the quick", "héllo", "0123 fox", "lazy dog over the")]
    for e in (fast, plain):
        e.start()
    try:
        assert run(fast, prompts) == run(plain, prompts)  # batched
        assert run(fast, prompts[:1]) == run(plain, prompts[:1])  # alone
    finally:
        for e in (fast, plain):
            e.shutdown(abort=True)


def test_kernel_follows_weight_updates():
    model = make_model()
    kernel = DecodeKernel(model)
    slots, lengths = [0], [12]
    ids = torch.tensor([3])

    def both():
        c_mod, c_ker = prefilled_caches(model, slots, lengths, seed=2)
        return module_step(model, c_mod, ids, slots, lengths), kernel.logits(ids, c_ker, slots, lengths)

    before, _ = both()
    with torch.no_grad():  # an optimizer-style in-place update, then a load_state_dict
        model.blocks[1].mlp.down.weight.mul_(-1.5)
        model.norm.weight.add_(0.7)
    ref, got = both()
    assert not torch.allclose(ref, before, atol=1e-3)
    assert_close(got, ref)
    state = {k: v.clone() for k, v in make_model(init_std=0.1).state_dict().items()}
    model.load_state_dict(state)
    ref, got = both()
    assert_close(got, ref)


@pytest.mark.parametrize("kw, why", [
    (dict(x0_mix=True), "x0_mix"),
    (dict(value_embeds=1), "value_embeds"),
    (dict(block="parallel"), "parallel"),
    (dict(moe_experts=2), "MLP"),
])
def test_models_it_does_not_restate_keep_the_module_path(tok, kw, why):
    model = make_model(**kw)
    assert why in DecodeKernel.unsupported(model)
    with pytest.raises(ValueError, match=why):
        DecodeKernel(model)
    engine = Engine(model, tok, max_batch=2)
    assert engine._kernel is None
    engine.start()
    try:
        assert len(run(engine, [tok.encode("the quick")])[0]) == 24
    finally:
        engine.shutdown(abort=True)


@pytest.mark.parametrize("flag", [[], ["--no-decode-kernel"]])
def test_spud_serve_uses_the_kernel_unless_told_not_to(serve_run, monkeypatch, flag):
    import spud.serve.server as server
    from spud.cli import main

    seen = {}

    def stop_before_listening(engine, *a, **k):
        seen["stats"] = engine.stats()
        raise KeyboardInterrupt  # serve() treats it as Ctrl-C: shuts the engine down, returns

    monkeypatch.setattr(server, "build_server", stop_before_listening)
    assert main(["serve", str(serve_run), "--device", "cpu", "--port", "1", *flag]) == 0
    assert seen["stats"]["decode_kernel"] == (0 if flag else 1)


def test_numpys_blas_gets_torchs_thread_count_in_the_engine_thread():
    """The kernel's products run on numpy's BLAS pool: in the thread that runs the steps (the
    engine's) it must use torch's thread count (what --threads / train.threads set), not every
    core, or a 1-thread benchmark and DDP ranks would secretly use more. Measured as CPU time
    over wall time of a large product in that thread, while another thread that used the pool
    at full width is alive (the case where OpenBLAS ignores a process-wide setting)."""
    import resource
    import threading

    import numpy as np

    if (os.cpu_count() or 1) < 2:
        pytest.skip("needs 2 cores to tell 1 BLAS thread from more")
    model = make_model()
    kernel = DecodeKernel(model)
    _, cache = prefilled_caches(model, [0], [5])
    a = np.random.default_rng(0).random((1200, 1200), dtype=np.float32)
    busy, release, seen = threading.Event(), threading.Event(), {}

    def other_user():  # e.g. a request handler doing numpy work at the pool's default width
        a @ a
        busy.set()
        release.wait(60)

    def engine_thread():
        kernel.logits(torch.tensor([3]), cache, [0], [5])
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        while time.perf_counter() - t0 < 0.5:
            a @ a
        r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        seen["cpu_per_wall"] = (r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime) / (t1 - t0)

    other = threading.Thread(target=other_user)
    other.start()
    busy.wait(60)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        t = threading.Thread(target=engine_thread)
        t.start()
        t.join()
    finally:
        torch.set_num_threads(before)
        release.set()
        other.join()
    assert seen["cpu_per_wall"] < 1.4, seen  # ~2.0 when the pool ignores the setting
