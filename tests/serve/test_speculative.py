"""Speculative decoding (serve/speculative.py): greedy outputs identical to plain decoding for both
drafters, with concurrent streams, stops and max_tokens ending mid-draft; the sampling acceptance
rule keeps the target's distribution; a draft run with another tokenizer is refused at start-up."""

from __future__ import annotations

import shutil

import pytest
import torch

from spud.config import ModelConfig, TokenizerConfig
from spud.errors import SpudError
from spud.model.registry import build_model
from spud.serve.engine import Engine, FinishEvent, SamplingParams
from spud.serve.speculative import _accept_sampled
from spud.tokenizer import train_tokenizer

TEXTS = ["the quick brown fox jumps over the lazy dog. " * 3, "1234567890 abc def ghi"] * 20


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(iter(TEXTS), TokenizerConfig(vocab_size=300, min_frequency=1))


def make_model(tok, seed=0, d=64, layers=2):
    torch.manual_seed(seed)
    return build_model(ModelConfig(d_model=d, n_layers=layers, n_heads=4, n_kv_heads=2, init_std=0.3,
                                   vocab_size=tok.vocab_size, max_seq_len=256)).eval()


@pytest.fixture(scope="module")
def target(tok):
    return make_model(tok)


def prompts():
    g = torch.Generator().manual_seed(1)
    out = [torch.randint(4, 290, (n,), generator=g).tolist() for n in (150, 7, 61, 200, 1, 33)]
    out.append([11, 12, 13, 14, 15] * 8)  # repetitive: prompt lookup finds long matches
    return out


def run(engine, ps, **params):
    engine.start()
    try:
        handles = [engine.submit(p, SamplingParams(**{"temperature": 0, "max_tokens": 30,
                                                      "ignore_eos": True, **params})) for p in ps]
        results = [h.result() for h in handles]
        return [([e.token_id for e in toks], text, fin.reason) for text, toks, fin in results], engine.stats()
    finally:
        engine.shutdown(abort=True)


DRAFTERS = {
    "ngram": lambda tok, target: {"speculate": 4},
    "draft-same": lambda tok, target: {"speculate": 4, "draft_model": target},  # accepts everything
    # another architecture, random: nearly every draft is rejected
    "draft-small": lambda tok, target: {"speculate": 3, "draft_model": make_model(tok, 1, 32, 1)},
    # the target with perturbed weights: drafts partly kept, so both branches run in every step
    "draft-noisy": lambda tok, target: {"speculate": 4, "draft_model": noisy_copy(target)},
}


def noisy_copy(model, scale=0.02):
    import copy

    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for w in out.parameters():
            w.add_(torch.randn(w.shape, generator=g) * scale * w.std().nan_to_num())
    return out


@pytest.mark.parametrize("drafter", sorted(DRAFTERS))
@pytest.mark.parametrize("max_batch", [8, 3])  # 3 < 7 prompts: queueing and slot reuse
def test_greedy_outputs_identical_to_plain(tok, target, drafter, max_batch):
    ps = prompts()
    want, _ = run(Engine(target, tok, max_batch=max_batch), ps)
    eng = Engine(target, tok, max_batch=max_batch, **DRAFTERS[drafter](tok, target))
    if drafter in ("draft-same", "draft-small"):
        # no early stop: draft-same must keep all k tokens, draft-small shows the k schedule
        eng._spec.drafter.confidence = 0.0
    got, stats = run(eng, ps)
    assert got == want
    assert stats["spec_draft_tokens_total"] > 0
    if drafter != "draft-small":
        assert stats["spec_accepted_tokens_total"] > 0
    if drafter == "draft-small":  # drafts always rejected: the row's draft length drops to 1
        assert stats["spec_draft_tokens_total"] < 1.5 * stats["completion_tokens_total"]
    if drafter == "draft-noisy":
        assert 0.1 < stats["spec_acceptance_rate"] < 0.95, stats
    if drafter == "draft-same":  # the draft cache's catch-up and rollback are right
        assert stats["spec_acceptance_rate"] == 1.0
        assert stats["spec_tokens_per_row_step"] > 3


def test_draft_cache_holds_only_accepted_tokens(tok, target):
    """After steps with rejected drafts, the draft model's KV slot equals a fresh forward over
    the tokens actually kept (rejected positions were rolled back and recomputed)."""
    draft = noisy_copy(target)
    p = prompts()[1]
    eng = Engine(target, tok, max_batch=1, speculate=4, draft_model=draft)
    eng._spec.drafter.confidence = 0.0  # draft on even when unsure: some drafts get rejected
    (ids, _, _), = run(eng, [p], max_tokens=40)[0]
    assert 0 < eng._spec.accepted < eng._spec.drafted  # some drafts were rejected
    seq = p + ids
    n = len(seq) - 1 - 5  # leave out the last step's window
    cache = draft.new_slot_cache(1, 256)
    with torch.no_grad():
        draft.forward_slots(torch.tensor([seq[:n]]), cache, [0], [0])
    for layer in range(draft.cfg.n_layers):
        got = eng._spec.drafter.cache.k[layer][0, :n]
        assert (got - cache.k[layer][0, :n]).abs().max() < 1e-4


@pytest.mark.parametrize("drafter", ["ngram", "draft-same"])
def test_stop_strings_and_max_tokens_ending_mid_draft(tok, target, drafter):
    """Drafts of K=4 run past the stop string / max_tokens: nothing past them is emitted, the
    finish reason and text are those of plain decoding."""
    ps = prompts()
    plain, _ = run(Engine(target, tok, max_batch=8), ps)
    # a stop string from the middle of each plain answer (tokens 6..8): generation must end there
    for (ids, text, _), p in zip(plain, ps):
        stop = tok.decode(ids[6:8], skip_special=True)
        if not stop.strip():
            continue
        kw = {"stop": [stop], "max_tokens": 30}
        want, _ = run(Engine(target, tok, max_batch=8), [p], **kw)
        got, _ = run(Engine(target, tok, max_batch=8, **DRAFTERS[drafter](tok, target)), [p], **kw)
        assert got == want and want[0][2] == "stop"
    for n in (1, 2, 7, 11):  # K + 1 = 5 does not divide these
        want, _ = run(Engine(target, tok, max_batch=8), ps, max_tokens=n)
        got, _ = run(Engine(target, tok, max_batch=8, **DRAFTERS[drafter](tok, target)), ps, max_tokens=n)
        assert got == want and all(len(ids) == n and r == "length" for ids, _, r in got)


def test_end_of_context_and_mixed_rows(tok, target):
    """Rows near the context end, rows with penalties, logprobs or a logit bias, in one batch."""
    ps = prompts()
    jobs = [(ps[0], {"frequency_penalty": 0.5}), (ps[1], {"logprobs": 2}), (ps[6], {}),
            (ps[3], {"max_tokens": 56}),  # 200 + 56 = max_context: the cache ends mid-draft
            (ps[2], {"logit_bias": {11: 3.0, 12: 2.0}, "logprobs": 1})]
    outs = []
    for kw in ({}, {"speculate": 4}, {"speculate": 4, "draft_model": target}):
        eng = Engine(target, tok, max_batch=5, **kw)
        eng.start()
        hs = [eng.submit(p, SamplingParams(temperature=0, ignore_eos=True, **{"max_tokens": 30, **o}))
              for p, o in jobs]
        outs.append([h.result() for h in hs])
        eng.shutdown()
    for got in outs[1:]:
        for (t_text, t_toks, t_fin), (g_text, g_toks, g_fin) in zip(outs[0], got):
            assert [e.token_id for e in g_toks] == [e.token_id for e in t_toks]
            assert (g_text, g_fin.reason) == (t_text, t_fin.reason)
            for a, b in zip(t_toks, g_toks):  # logprobs of the verified positions match too
                assert (a.logprob is None) == (b.logprob is None)
                if a.logprob is not None:
                    assert abs(a.logprob - b.logprob) < 1e-4
                    assert [i for i, _ in a.top_logprobs] == [i for i, _ in b.top_logprobs]
    assert len(outs[0][3][1]) == 56


def test_prefix_cache_with_speculation(tok, target):
    """Second turn reuses the first turn's blocks (the draft model re-prefills its own cache)."""
    p = prompts()[3]
    turns = [p, p + [5, 6, 7]]
    outs = []
    for kw in ({}, {"speculate": 3, "draft_model": target, "prefix_cache_tokens": 512}):
        eng = Engine(target, tok, max_batch=2, **kw)
        eng.start()
        try:
            outs.append([[e.token_id for e in eng.submit(t, SamplingParams(
                temperature=0, max_tokens=30, ignore_eos=True)).result()[1]] for t in turns])
        finally:
            eng.shutdown()
    assert outs[1] == outs[0]
    assert eng.stats()["prefix_cache_hit_tokens"] >= 192


def test_acceptance_rule_keeps_the_target_distribution():
    """Point-mass proposal d: P(first token = x) must be p0(x) whatever d is; after an accepted
    d the next token follows p1."""
    p = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.1, 0.1, 0.1, 0.7]])
    g = torch.Generator().manual_seed(0)
    n = 6000
    for d in (0, 1, 3):  # likely, unlikely, impossible drafts
        first = torch.zeros(4)
        second = torch.zeros(4)
        for _ in range(n):
            out = _accept_sampled(p, [d], g)
            first[out[0]] += 1
            if len(out) == 2:
                second[out[1]] += 1
        assert torch.allclose(first / n, p[0], atol=0.025), (d, first / n)
        if second.sum():
            assert torch.allclose(second / second.sum(), p[1], atol=0.05)
        assert first[3] == 0  # a zero-probability token is never emitted
    # a draft drawn from a distribution q (the draft model's): min(1, p/q) acceptance
    q = torch.tensor([0.1, 0.6, 0.0, 0.3])
    first = torch.zeros(4)
    for _ in range(n):
        d = int(torch.multinomial(q, 1, generator=g))
        first[_accept_sampled(p, [d], g, [q])[0]] += 1
    assert torch.allclose(first / n, p[0], atol=0.025), first / n


def test_sampled_drafts_from_the_same_model_are_all_kept(tok, target):
    """The draft model samples from q under the row's settings; with q == p (the target drafts
    for itself) min(1, p/q) = 1: nearly every draft is kept (a point-mass rule would keep only
    p(d) of them)."""
    eng = Engine(target, tok, max_batch=8, speculate=4, draft_model=target)
    eng._spec.drafter.confidence = 0.0
    _, stats = run(eng, prompts(), temperature=0.9, top_p=0.95, seed=3, max_tokens=20)
    assert stats["spec_acceptance_rate"] > 0.95, stats


def test_sampling_with_speculation_is_seeded_and_valid(tok, target):
    ps = prompts()
    kw = {"temperature": 1.0, "top_k": 20, "max_tokens": 20}
    a = run(Engine(target, tok, max_batch=8, speculate=4, draft_model=target),
            [p for p in ps], seed=7, **kw)
    b = run(Engine(target, tok, max_batch=8, speculate=4, draft_model=target), ps, seed=7, **kw)
    assert a[0] == b[0]
    assert a[1]["spec_accepted_tokens_total"] > 0  # the same model drafts: many drafts kept
    assert all(len(ids) == 20 for ids, _, _ in a[0])


def test_drafter_failure_falls_back_to_plain_decoding(tok, target):
    ps = prompts()
    want, _ = run(Engine(target, tok, max_batch=8), ps)
    eng = Engine(target, tok, max_batch=8, speculate=3, draft_model=noisy_copy(target))
    real, calls = eng._spec.drafter.propose, []

    def flaky(rows, ks):  # every third step the drafter fails, after writing its cache
        calls.append(1)
        out = real(rows, ks)
        if len(calls) % 3 == 0:
            raise RuntimeError("draft failed")
        return out

    eng._spec.drafter.propose = flaky
    got, stats = run(eng, ps)
    assert got == want
    assert "draft failed" in eng._spec.last_error and stats["spec_accepted_tokens_total"] > 0


def test_bad_settings_are_clear_errors(tok, target):
    with pytest.raises(SpudError, match=r"speculate must be 0 \(off\) or >= 1"):
        Engine(target, tok, speculate=-1)
    with pytest.raises(SpudError, match="draft model needs speculate"):
        Engine(target, tok, draft_model=target)


# ------------------------------------------------------------------- runs: the --draft option
def test_draft_run_with_another_tokenizer_is_refused(serve_run, tmp_path, capsys):
    from spud.cli import main

    other = tmp_path / "other-run"
    shutil.copytree(serve_run, other)
    train_tokenizer(iter(TEXTS), TokenizerConfig(vocab_size=400, min_frequency=1)).save(
        other / "tokenizer.json")
    with pytest.raises(SpudError, match="tokenizer .* differs from the served model"):
        Engine.from_run(serve_run, device="cpu", speculate=2, draft=str(other))
    rc = main(["serve", str(serve_run), "--draft", str(other), "--device", "cpu", "--port", "1"])
    err = capsys.readouterr().err
    assert rc != 0 and "must share the tokenizer" in err and "Traceback" not in err


def test_served_with_draft_run_same_answers_and_metrics(serve_run, start_server, live, model_name):
    import httpx

    srv = start_server(speculate=3, draft=str(serve_run))
    body = {"model": model_name, "prompt": "the quick brown", "max_tokens": 12, "temperature": 0}
    want = httpx.post(f"{live.url}/v1/completions", json=body, timeout=30).json()
    got = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=30).json()
    assert got["choices"][0]["text"] == want["choices"][0]["text"]
    metrics = httpx.get(f"{srv.url}/metrics", timeout=30).text
    rate = [ln for ln in metrics.splitlines() if ln.startswith("spud_engine_spec_acceptance_rate ")]
    assert rate and float(rate[0].split()[1]) == 1.0  # the run drafts for itself


def test_speculation_benchmark_runs(serve_run, tmp_path):
    """benchmarks/speculation.py end to end on a tiny run drafting for itself: every contender
    reports, outputs are identical to plain decoding, the self-draft keeps every greedy draft."""
    import importlib.util
    import json
    from pathlib import Path

    script = Path(__file__).parents[2] / "benchmarks" / "speculation.py"
    spec = importlib.util.spec_from_file_location("speculation_bench", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "spec.json"
    threads = torch.get_num_threads()
    try:
        assert bench.main([str(serve_run), "--draft", str(serve_run), "--batch", "2", "--max-tokens", "6",
                           "--prompt-tokens", "12", "--rounds", "1", "--workloads", "copy",
                           "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    rows = json.loads(out.read_text())["rows"]
    assert [r["contender"] for r in rows] == ["plain", "ngram-k4", "draft-k4"]
    assert all(r["identical_to_plain"] and r["tokens_per_s"] > 0 for r in rows)
    assert rows[2]["acceptance"] == 1.0
