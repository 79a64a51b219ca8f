"""The batched scorer (spud.eval.batch_scorer) against one-request-per-forward scoring written out
by hand: same numbers (<= 1e-5) whatever the batch packing and request order, left-truncation
of long contexts, rolling windows equal to lm-eval's, and the callers (native mc eval, engine
echo logprobs) going through it."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from spud.config import ModelConfig
from spud.eval import batch_scorer
from spud.eval.batch_scorer import pack, rolling_pairs, score, score_rolling
from spud.model.registry import build_model

V, L = 97, 32


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    # init_std 0.3: large logits, a hard case for equality. Tied: with an untied head of this
    # init one log-prob of -10.64 (of ~200) differs by 1.05e-5 (relative 1e-6, fp32 round-off).
    cfg = ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=V, max_seq_len=L,
                      init_std=0.3, tie_embeddings=True)
    return build_model(cfg).eval()


def by_hand(model, ctx, cont):
    """One request, one forward of exactly its tokens: the last L + 1 of ctx + cont, the final
    one only a target."""
    seq = (list(ctx) + list(cont))[-(L + 1):]
    n = min(len(cont), len(seq) - 1)
    if n <= 0:
        return 0.0, True, []
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([seq[:-1]]))[0].float(), dim=-1)
    rows = logp[len(seq) - 1 - n:]
    tgt = torch.tensor(seq[-n:])
    per = rows.gather(1, tgt[:, None]).squeeze(1)
    return float(per.sum()), bool((rows.argmax(-1) == tgt).all()), per.tolist()


def requests(seed=0):
    rng = random.Random(seed)
    tok = lambda n: [rng.randrange(1, V) for _ in range(n)]  # noqa: E731
    pairs = [(tok(rng.randint(1, 20)), tok(rng.randint(1, 6))) for _ in range(30)]
    pairs += [
        (tok(60), tok(3)),      # context cut from the left
        (tok(25), tok(20)),     # ctx + cont just over the window
        (tok(5), tok(50)),      # continuation longer than the window: its tail is scored
        ([], tok(4)),           # no context: the first token is not scored
        (tok(3), []),           # nothing to score
        ([], tok(1)),           # nothing to score either
        (tok(L), tok(1)),       # exactly L + 1 tokens
    ]
    rng.shuffle(pairs)
    return pairs


@pytest.mark.parametrize("budget,max_rows", [(1, None), (64, None), (10**6, None), (10**6, 3)])
def test_batched_equals_one_request_per_forward(model, budget, max_rows):
    pairs = requests()
    got = score(model, pairs, token_budget=budget, max_rows=max_rows, per_token=True)
    assert len(got) == len(pairs)
    for (ctx, cont), s in zip(pairs, got):
        want, greedy, per = by_hand(model, ctx, cont)
        assert s.token_logprobs == pytest.approx(per, abs=1e-5)  # every token within 1e-5...
        assert s.logprob == pytest.approx(want, abs=1e-5 * max(1, len(per)))  # ...so their sum too
        assert s.greedy == greedy


def test_left_truncation_keeps_the_last_window(model):
    ctx, cont = list(range(1, 61)), [5, 6, 7]
    (s,) = score(model, [(ctx, cont)])
    (s_cut,) = score(model, [(ctx[-(L + 1 - len(cont)):], cont)])  # what must be kept
    assert s.logprob == pytest.approx(s_cut.logprob, abs=1e-6)
    (s_more,) = score(model, [(ctx[-(L - len(cont)):], cont)])  # one token less of context
    assert s.logprob != pytest.approx(s_more.logprob, abs=1e-4)


def test_top_n_matches_the_full_distribution(model):
    ctx, cont = [3, 1, 4, 1, 5], [9, 2, 6]
    (s,) = score(model, [(ctx, cont)], top_n=4)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ctx + cont[:-1]]))[0].float(), -1)
    for j, alts in enumerate(s.top):
        tv, ti = torch.topk(logp[len(ctx) - 1 + j], 4)
        assert [a for a, _ in alts] == ti.tolist()
        assert [v for _, v in alts] == pytest.approx(tv.tolist(), abs=1e-5)


def test_pack_respects_the_budget_longest_first():
    lengths = [5, 40, 7, 7, 12, 100, 1, 3]
    batches = pack(lengths, token_budget=30)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert lengths[b[0]] == max(lengths[i] for i in b)  # the padded width is the first row's
        assert len(b) == 1 or len(b) * lengths[b[0]] <= 30
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(lengths, reverse=True)
    assert all(len(b) <= 2 for b in pack(lengths, 10**6, max_rows=2))


def test_many_requests_take_few_forwards(model, monkeypatch):
    calls = []
    real = model.hidden_states
    monkeypatch.setattr(model, "hidden_states", lambda x: calls.append(x.shape) or real(x))
    score(model, [([1, 2, 3], [4, 5])] * 40, token_budget=4 * 40)
    assert calls == [torch.Size([40, 4])]  # one forward, not one per request


def test_plain_callable_model_without_hidden_states():
    table = torch.zeros(10, 10)
    table[1, 7] = 5.0

    class Bigram(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.table = torch.nn.Parameter(table, requires_grad=False)
            self.cfg = SimpleNamespace(max_seq_len=8)

        def forward(self, idx):
            return self.table[idx]

    s = score(Bigram(), [([0, 1], [7]), ([0, 1], [3])])
    lz = torch.logsumexp(table[1], 0).item()
    assert [x.logprob for x in s] == pytest.approx([5 - lz, -lz], abs=1e-6)


def test_rolling_windows_equal_lm_evals():
    utils = pytest.importorskip("lm_eval.utils")
    for n in (1, 5, L, L + 1, 3 * L + 7):
        ids = list(range(1, n + 1))
        want = [utils.make_disjoint_window(w) for w in utils.get_rolling_token_windows(
            token_list=ids, prefix_token=0, max_seq_len=L, context_len=1)]
        assert rolling_pairs(ids, 0, L) == [(list(c), list(t)) for c, t in want]


def test_rolling_score_is_the_sum_of_its_windows(model):
    rng = random.Random(1)
    texts = [[rng.randrange(1, V) for _ in range(n)] for n in (3 * L + 7, 10, 0, L)]
    got = score_rolling(model, texts, prefix=0, token_budget=100)
    for ids, total in zip(texts, got):
        assert total == pytest.approx(sum(by_hand(model, c, t)[0] for c, t in rolling_pairs(ids, 0, L)),
                                      abs=1e-4)
    assert got[2] == 0.0
    assert got[1] == pytest.approx(by_hand(model, [0], texts[1])[0], abs=1e-5)


def test_native_mc_eval_batched_equals_per_example():
    from spud.eval.builtin_tasks import make_task
    from spud.eval.runner import eval_mc, eval_mc_many, render_prompt
    from spud.tokenizer import train_tokenizer
    from spud.config import TokenizerConfig

    task = make_task("mc_arithmetic", 0)
    texts = [ex.prompt + c for ex in task.examples[:50] for c in ex.choices]
    tok = train_tokenizer(iter(texts * 3), TokenizerConfig(vocab_size=300, min_frequency=1))
    torch.manual_seed(0)
    net = build_model(ModelConfig(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, init_std=0.3,
                                  vocab_size=tok.vocab_size, max_seq_len=64)).eval()
    exs = task.examples[:24]
    ctxs = [render_prompt(task, ex, [], tok, False) for ex in exs]
    many = eval_mc_many(net, tok, task, exs, ctxs, False)
    for ex, ctx, row in zip(exs, ctxs, many):
        one = eval_mc(net, tok, task, ex, ctx, False)
        assert row["scores"] == pytest.approx(one["scores"], abs=1e-5)
        assert (row["pred"], row["pred_norm"]) == (one["pred"], one["pred_norm"])
        want = [by_hand_lp(net, ctx, tok.encode(c)) for c in ex.choices]
        assert row["scores"] == pytest.approx(want, abs=1e-5)


def by_hand_lp(net, ctx, cont):
    with torch.no_grad():
        logp = torch.log_softmax(net(torch.tensor([ctx + cont]))[0].float(), -1)
    return sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))


def test_engine_echo_logprobs_go_through_the_batched_scorer(model, monkeypatch):
    from spud.serve.engine import Engine

    tok = SimpleNamespace(end_id=1, eos_id=2, bos_id=3, pad_id=0, decode=lambda ids, **k: "")
    eng = Engine(model, tok, max_batch=2)
    prompts = [[5, 6, 7, 8], [9], list(range(10, 30)), [4, 4]]
    seen = []
    real = batch_scorer.score
    monkeypatch.setattr(batch_scorer, "score", lambda *a, **k: seen.append(len(a[1])) or real(*a, **k))
    many = eng.prompt_logprobs_many(prompts, top_n=2)
    assert seen == [len(prompts)]  # one scoring call for all prompts
    for p, got in zip(prompts, many):
        alone = eng.prompt_logprobs(p, 2)
        assert [g[0] for g in got[1:]] == pytest.approx([a[0] for a in alone[1:]], abs=1e-5)
        assert [[i for i, _ in g[1]] for g in got] == [[i for i, _ in a[1]] for a in alone]
        assert got[0] == (None, []) and len(got) == len(p)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([p]))[0].float(), -1)
        for i in range(1, len(p)):
            assert got[i][0] == pytest.approx(float(logp[i - 1, p[i]]), abs=1e-5)
            assert got[i][1][0][0] == int(logp[i - 1].argmax())
