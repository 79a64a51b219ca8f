"""The OpenAI-compatible API driven with the official `openai` client against a live server."""

from __future__ import annotations

import asyncio

import pytest

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]


def _engine_greedy(live, ids: list[int], max_tokens: int, **kw):
    """The same request straight to the engine, bypassing HTTP: (text, token events, finish)."""
    from spud.serve.engine import SamplingParams

    return live.engine.submit(ids, SamplingParams(max_tokens=max_tokens, temperature=0, **kw)).result()


def _model_logprobs(live, ids: list[int], gen: list[int], top: int):
    """Log-probs of `gen` after `ids` from one full forward pass (not the decode loop's cache)."""
    return live.engine.prompt_logprobs(ids + gen, top)[len(ids):]


def test_models_and_health(client, http, model_name, live):
    models = client.models.list()
    assert [m.id for m in models.data] == [model_name]
    assert http.get(f"/v1/models/{model_name}").json()["max_model_len"] == live.engine.max_context
    r = http.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_completion_shape_and_usage(client, model_name, live):
    r = client.completions.create(model=model_name, prompt="The ", max_tokens=5, temperature=0)
    assert r.id.startswith("cmpl-") and r.object == "text_completion" and r.model == model_name
    assert r.created > 0 and len(r.choices) == 1
    c = r.choices[0]
    tok = live.engine.tokenizer
    ids = [tok.bos_id, *tok.encode("The ")]  # + the BOS the server prepends
    text, _, fin = _engine_greedy(live, ids, 5)
    assert (c.text, c.finish_reason) == (text, fin.reason)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == fin.completion_tokens
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_string_and_token_prompts_agree(client, model_name, live):
    ids = live.engine.tokenizer.encode("def f(x):")
    a = client.completions.create(model=model_name, prompt="def f(x):", max_tokens=6, temperature=0)
    b = client.completions.create(model=model_name, prompt=ids, max_tokens=6, temperature=0)
    assert a.choices[0].text == b.choices[0].text
    batch = client.completions.create(model=model_name, prompt=[ids, ids], max_tokens=6, temperature=0, n=2)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert {c.text for c in batch.choices} == {a.choices[0].text}


def test_seed_reproducible_and_n(client, model_name):
    kw = {"model": model_name, "messages": CHAT, "max_tokens": 8, "temperature": 1.0, "seed": 1234}
    a = client.chat.completions.create(n=2, **kw)
    b = client.chat.completions.create(n=2, **kw)
    assert a.id.startswith("chatcmpl-") and a.object == "chat.completion"
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert [c.index for c in a.choices] == [0, 1]
    assert all(c.message.role == "assistant" for c in a.choices)
    # the two choices use seed and seed+1: they are different samples
    assert a.choices[0].message.content != a.choices[1].message.content


def test_stop_string(client, model_name):
    kw = {"model": model_name, "prompt": "import os\n", "max_tokens": 12, "temperature": 0}
    full = client.completions.create(**kw).choices[0].text
    assert full, "greedy text is empty"
    stop = full[len(full) // 2]
    r = client.completions.create(stop=[stop], **kw).choices[0]
    assert r.text == full[: full.index(stop)] and r.finish_reason == "stop"


def test_completion_logprobs(client, model_name, live):
    tok = live.engine.tokenizer
    r = client.completions.create(model=model_name, prompt="x = ", max_tokens=4, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    _, events, _ = _engine_greedy(live, [tok.bos_id, *tok.encode("x = ")], 4)
    gen = [e.token_id for e in events]
    expected = _model_logprobs(live, [tok.bos_id, *tok.encode("x = ")], gen, 2)
    assert lp.tokens == [tok.decode([i]) for i in gen] and len(gen) >= 1
    assert lp.token_logprobs == pytest.approx([v for v, _ in expected], abs=1e-4)
    for top, (_, alts) in zip(lp.top_logprobs, expected):
        want = {}
        for a, v in alts:  # two ids that decode to the same string share one key, as with OpenAI
            want.setdefault(tok.decode([a]), v)
        assert top == pytest.approx(want, abs=1e-4)
    # greedy: the chosen token is the best alternative
    assert [max(t.values()) for t in lp.top_logprobs] == pytest.approx(lp.token_logprobs, abs=1e-4)
    starts = [len("x = ") + sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert lp.text_offset == starts


def test_echo_max_tokens_zero_scores_prompt(client, model_name, live):
    """What lm-evaluation-harness's loglikelihood does: echo the prompt with its logprobs."""
    prompt = "for i in range(10):"
    r = client.completions.create(model=model_name, prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    c = r.choices[0]
    lp = c.logprobs
    ids = live.engine.tokenizer.encode(prompt)
    assert c.text == prompt and r.usage.completion_tokens == 0
    assert "".join(lp.tokens) == prompt and len(lp.token_logprobs) == len(ids)
    expected = [v for v, _ in live.engine.prompt_logprobs([live.engine.tokenizer.bos_id, *ids])[1:]]
    # as OpenAI: the first prompt token has no logprob and no alternatives (null, null)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx(expected[1:], abs=1e-5)
    assert all(len(t) == 1 for t in lp.top_logprobs[1:])
    assert lp.text_offset[0] == 0 and lp.text_offset[-1] == len(prompt) - len(lp.tokens[-1])
    # echo together with generation: prompt logprobs followed by the generated ones
    g = client.completions.create(model=model_name, prompt=prompt, max_tokens=3, echo=True, logprobs=1,
                                  temperature=0).choices[0]
    assert g.text.startswith(prompt) and len(g.logprobs.tokens) == len(ids) + 3


def test_chat_logprobs(client, model_name, live):
    tok = live.engine.tokenizer
    r = client.chat.completions.create(model=model_name, messages=CHAT, max_tokens=4, temperature=0,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    ids = tok.render_chat(CHAT, add_generation_prompt=True)[0]
    _, events, _ = _engine_greedy(live, ids, 4, stop_token_ids=[tok.end_id])
    gen = [e.token_id for e in events]
    expected = _model_logprobs(live, ids, gen, 3)
    assert [c.token for c in content] == [tok.decode([i]) for i in gen] and len(gen) >= 1
    assert [c.logprob for c in content] == pytest.approx([v for v, _ in expected], abs=1e-4)
    for item, (_, alts) in zip(content, expected):
        assert [t.token for t in item.top_logprobs] == [tok.decode([a]) for a, _ in alts]
        assert [t.logprob for t in item.top_logprobs] == pytest.approx([v for _, v in alts], abs=1e-4)
        assert item.bytes == list(item.token.encode("utf-8"))


def test_max_completion_tokens(client, model_name, live):
    tok = live.engine.tokenizer
    no_end = {str(tok.end_id): -100, str(tok.eos_id): -100, str(tok.bos_id): -100}
    r = client.chat.completions.create(model=model_name, messages=CHAT, max_completion_tokens=3, temperature=0,
                                       logit_bias=no_end)
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"
    # max_completion_tokens wins over the older max_tokens when both are given
    r = client.chat.completions.create(model=model_name, messages=CHAT, max_completion_tokens=2, max_tokens=5,
                                       temperature=0, logit_bias=no_end)
    assert r.usage.completion_tokens == 2


def test_async_client(client, aclient, model_name):
    kw = {"model": model_name, "messages": CHAT, "max_tokens": 4, "temperature": 0}

    async def go():
        r = await aclient.chat.completions.create(**kw)
        return r.choices[0].message.content

    assert asyncio.run(go()) == client.chat.completions.create(**kw).choices[0].message.content


def test_tokenize_detokenize(http, live, model_name):
    tok = live.engine.tokenizer
    r = http.post("/tokenize", json={"model": model_name, "prompt": "hello world"}).json()
    assert r["tokens"] == tok.encode("hello world", add_bos=True) and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == live.engine.max_context
    m = http.post("/tokenize", json={"messages": CHAT}).json()
    assert m["tokens"] == tok.render_chat(CHAT, add_generation_prompt=True)[0]
    d = http.post("/detokenize", json={"tokens": tok.encode("hello world")}).json()
    assert d["prompt"] == "hello world"


def test_metrics_text(client, http, model_name):
    client.completions.create(model=model_name, prompt="a", max_tokens=2)
    text = http.get("/metrics").text
    assert http.get("/metrics").headers["content-type"].startswith("text/plain")
    for name in ("spud_http_requests_total", "spud_prompt_tokens_total", "spud_completion_tokens_total",
                 "spud_num_requests_running", "spud_num_requests_waiting",
                 "spud_time_to_first_token_seconds_bucket", "spud_e2e_request_latency_seconds_count"):
        assert name in text
    assert 'spud_http_requests_total{endpoint="/v1/completions",status="200"}' in text
    assert "# TYPE spud_time_to_first_token_seconds histogram" in text
    assert 'le="+Inf"' in text
