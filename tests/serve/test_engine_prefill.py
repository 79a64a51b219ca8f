"""Chunked prefill: a long prompt is written to its KV slot in chunks interleaved with the running
streams' decode steps; outputs and the cache contents equal whole-prompt prefill."""

from __future__ import annotations

import pytest
import torch

from spud.config import ModelConfig, TokenizerConfig
from spud.errors import SpudError
from spud.model.registry import build_model
from spud.serve.engine import Engine, FinishEvent, SamplingParams
from spud.tokenizer import train_tokenizer

TEXTS = ["the quick brown fox jumps over the lazy dog. " * 3, "1234567890 abc def ghi"] * 20


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(iter(TEXTS), TokenizerConfig(vocab_size=300, min_frequency=1))


def make_model(tok):
    torch.manual_seed(0)
    return build_model(ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, init_std=0.3,
                                   vocab_size=tok.vocab_size, max_seq_len=256)).eval()


def run_all(engine, prompts, max_tokens):
    handles = [engine.submit(p, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
               for p in prompts]
    outs = []
    for h in handles:
        toks = [e.token_id for e in h if not isinstance(e, FinishEvent)]
        outs.append(toks)
    return outs


def long_prompts(n):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(4, 290, (L,), generator=g).tolist() for L in (150, 7, 61, 200, 1, 33)[:n]]


@pytest.mark.parametrize("chunk,step", [(7, None), (16, 20), (1, 1), (64, 3)])
def test_chunked_prefill_outputs_and_cache_equal_whole_prompt(tok, chunk, step):
    model = make_model(tok)
    prompts = long_prompts(6)
    whole = Engine(model, tok, max_batch=8, prefill_chunk=None)
    chunked = Engine(model, tok, max_batch=8, prefill_chunk=chunk, step_tokens=step)
    for e in (whole, chunked):
        e.start()
    try:
        want = run_all(whole, prompts, 12)
        got = run_all(chunked, prompts, 12)
        assert got == want
        assert all(len(o) == 12 for o in got)
        # one long prompt alone: the slot holds the same keys and values either way
        p = prompts[3]
        for e in (whole, chunked):
            run_all(e, [p], 1)
        for layer in range(model.cfg.n_layers):
            for a, b in ((whole._cache.k, chunked._cache.k), (whole._cache.v, chunked._cache.v)):
                diff = (a[layer][0, :len(p)] - b[layer][0, :len(p)]).abs().max().item()
                assert diff <= 1e-4, diff
    finally:
        whole.shutdown(abort=True)
        chunked.shutdown(abort=True)


def test_long_prompt_does_not_freeze_running_streams(tok):
    """While a 200-token prompt is prefilled in 8-token chunks (budget 10 tokens a step), a running
    stream keeps getting a token every step: it gains many tokens before the long prompt's first."""
    model = make_model(tok)
    eng = Engine(model, tok, max_batch=4, prefill_chunk=8, step_tokens=10)
    order: list[str] = []
    eng.start()

    def record(h, name):  # _emit runs on the engine thread: `order` is the engine's own order
        real = h._emit
        h._emit = lambda ev: (order.append(name) if not isinstance(ev, FinishEvent) else None, real(ev))
    try:
        short = eng.submit(long_prompts(2)[1], SamplingParams(temperature=0, max_tokens=80, ignore_eos=True))
        record(short, "s")
        long = eng.submit(long_prompts(4)[3], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
        record(long, "l")  # its first token needs >= 22 steps: recorded in time
        short.result()
        long.result()
    finally:
        eng.shutdown(abort=True)
    # 200 tokens at <= 9 a step (10 minus the short stream's decode row): >= 22 steps of prefill,
    # each of which also decoded the short stream
    assert order.index("l") >= 20, order[:40]


def test_bad_limits_are_clear_errors(tok):
    model = make_model(tok)
    with pytest.raises(SpudError, match="prefill_chunk"):
        Engine(model, tok, prefill_chunk=0)
    with pytest.raises(SpudError, match="step_tokens"):
        Engine(model, tok, step_tokens=0)
    for bad in (-5, 3):
        with pytest.raises(SpudError, match="prefix_cache_tokens"):
            Engine(model, tok, prefix_cache_tokens=bad)


# ------------------------------------------------------------------------------- prefix cache
def test_prefix_cache_second_turn_reuses_blocks_with_identical_outputs(tok):
    """Turn 2 of a chat = turn 1's prompt + its answer + a new message: with the cache its prefill
    starts after the cached blocks, and every output equals the engine without a cache."""
    model = make_model(tok)
    plain = Engine(model, tok, max_batch=4, prefill_chunk=32)
    cached = Engine(model, tok, max_batch=4, prefill_chunk=32, prefix_cache_tokens=4096, prefix_block=16)
    for e in (plain, cached):
        e.start()
    try:
        turn1 = long_prompts(4)[3][:120]
        (a_plain,) = run_all(plain, [turn1], 10)
        (a_cached,) = run_all(cached, [turn1], 10)
        assert a_plain == a_cached
        assert cached.stats()["prefix_cache_hit_tokens"] == 0
        turn2 = turn1 + a_cached + long_prompts(2)[1]
        # overwrite the slot turn 1 used, so turn 2 can only get its prefix from the cache
        g = torch.Generator().manual_seed(7)
        run_all(cached, [torch.randint(4, 290, (200,), generator=g).tolist()], 1)
        assert cached.stats()["prefix_cache_hit_tokens"] == 0
        calls = []
        real = cached.model.forward_slots
        cached.model.forward_slots = lambda x, *a, **k: calls.append(x.shape[1]) or real(x, *a, **k)
        try:
            (b_cached,) = run_all(cached, [turn2], 10)
        finally:
            del cached.model.forward_slots
        (b_plain,) = run_all(plain, [turn2], 10)
        assert b_cached == b_plain
        st = cached.stats()
        # turn 1 left 129 positions (120 prompt + 9 fed-back answer tokens): 8 full blocks
        assert st["prefix_cache_hit_tokens"] == 128
        # only the new part was prefilled (decode steps: one token per call, or the decode kernel)
        assert sum(c for c in calls if c > 1) == len(turn2) - 128
        assert 0 < st["prefix_cache_hit_rate"] < 1
        # a prompt that differs in its first token shares nothing
        other = [turn2[0] + 1] + turn2[1:]
        before = cached.stats()["prefix_cache_hit_tokens"]
        run_all(cached, [other], 1)
        assert cached.stats()["prefix_cache_hit_tokens"] == before
    finally:
        plain.shutdown(abort=True)
        cached.shutdown(abort=True)


def test_prefix_cache_evicts_beyond_its_cap_and_stays_correct(tok):
    model = make_model(tok)
    plain = Engine(model, tok, max_batch=4, prefill_chunk=None)
    cached = Engine(model, tok, max_batch=4, prefill_chunk=None, prefix_cache_tokens=64, prefix_block=16)
    for e in (plain, cached):
        e.start()
    try:
        prompts = long_prompts(6)
        for p in prompts + prompts:
            assert run_all(cached, [p], 5) == run_all(plain, [p], 5)
        st = cached.stats()
        assert st["prefix_cache_blocks"] <= 4 and st["prefix_cache_evictions"] > 0
    finally:
        plain.shutdown(abort=True)
        cached.shutdown(abort=True)


def test_copies_and_equal_length_prompts_share_one_prefill_forward(tok):
    """RL groups and pass@k samples submit copies of one prompt: the engine prefills every prompt
    whose next chunk has the same length in one forward, computes each distinct prompt once (its
    copies' slots get its keys and values), and each request's tokens (greedy, and sampled with
    its own seed) are those it gets when prefilled alone."""
    model = make_model(tok)
    g = torch.Generator().manual_seed(3)
    distinct = [torch.randint(4, 290, (L,), generator=g).tolist() for L in (40, 40, 23)]
    prompts = [p for p in distinct for _ in range(4)]  # 12 requests, 3 prompts, 2 lengths
    params = [SamplingParams(temperature=0.0 if i % 2 else 1.0, seed=100 + i, max_tokens=10, ignore_eos=True)
              for i in range(len(prompts))]
    calls: list[tuple[int, int]] = []
    inner = model.forward_slots

    def counting(idx, *a, **k):
        calls.append(tuple(idx.shape))
        return inner(idx, *a, **k)

    model.forward_slots = counting
    outs = {}
    # one slot at a time (each prompt prefilled alone) against 12 slots and a generous budget
    # and against 16-token chunks under a 64-token budget: copies are copied chunk by chunk
    for name, kw in {"alone": dict(max_batch=1), "shared": dict(max_batch=12, step_tokens=4096),
                     "chunked": dict(max_batch=12, prefill_chunk=16, step_tokens=64)}.items():
        calls.clear()
        e = Engine(model, tok, **kw)
        e.start()
        try:
            hs = [e.submit(p, sp) for p, sp in zip(prompts, params)]
            outs[name] = [[ev.token_id for ev in h if not isinstance(ev, FinishEvent)] for h in hs]
        finally:
            e.shutdown()
        prefills = [c for c in calls if c[1] > 1]
        if name == "alone":
            assert len(prefills) == 12 and all(b == 1 for b, _ in prefills)
        elif name == "shared":  # the two 40-token prompts in one forward, the 23-token one in another
            assert sorted(prefills) == [(1, 23), (2, 40)]
        else:  # 40 = 16 + 16 + 8 and 23 = 16 + 7: each distinct prompt's chunks are computed once
            assert sum(b * t for b, t in prefills) == 40 + 40 + 23, prefills
    assert outs["shared"] == outs["alone"] == outs["chunked"]
    assert all(len(o) == 10 for o in outs["alone"])
    assert outs["alone"][0] != outs["alone"][2]  # seeded samples of one prompt differ
