"""Every error class in OpenAI's shape, and no 500 for any bad input."""

from __future__ import annotations

import json
import re
import time

import httpx
import openai
import pytest


def _err(r: httpx.Response, status: int, param=None) -> dict:
    assert r.status_code == status, r.text
    e = r.json()["error"]
    assert set(e) == {"message", "type", "param", "code"} and e["message"]
    if param is not None:
        assert e["param"] == param
    return e


def _chat(name, **kw):
    return {"model": name, "messages": [{"role": "user", "content": "hi"}], **kw}


@pytest.mark.parametrize("patch,param", [
    ({"max_tokens": -1}, "max_tokens"),
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": "0.5"}, "temperature"),  # strings in place of numbers
    ({"top_p": 0}, "top_p"),
    ({"presence_penalty": -3}, "presence_penalty"),
    ({"n": 10**9}, "n"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": {"999999": 1}}, "logit_bias"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"stream": "yes"}, "stream"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"model": 7}, "model"),
])
def test_chat_invalid_params(http, model_name, patch, param):
    e = _err(http.post("/v1/chat/completions", json=_chat(model_name, **patch)), 400, param)
    assert e["type"] == "invalid_request_error"


@pytest.mark.parametrize("patch,param", [
    ({"prompt": []}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": [10**9]}, "prompt"),
    ({"max_tokens": 0}, "max_tokens"),  # only allowed with echo
    ({"logprobs": 99}, "logprobs"),
    ({"echo": 1}, "echo"),
])
def test_completion_invalid_params(http, model_name, patch, param):
    _err(http.post("/v1/completions", json={"model": model_name, "prompt": "a", **patch}), 400, param)


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b"null", b"\"s\"", b"", b"\xff\xfe"])
def test_malformed_bodies(http, body):
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"):
        _err(http.post(path, content=body, headers={"content-type": "application/json"}), 400)


def _numbers(message: str) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", message)]


def test_context_length_states_both_numbers(client, http, model_name, live):
    ctx, tok = live.engine.max_context, live.engine.tokenizer
    n_prompt = len(tok.render_chat([{"role": "user", "content": "hi"}], add_generation_prompt=True)[0])
    # prompt fits, prompt + max_tokens does not: the limit, the total and both parts
    e = _err(http.post("/v1/chat/completions", json=_chat(model_name, max_tokens=ctx - 4)), 400, "messages")
    assert e["code"] == "context_length_exceeded" and n_prompt > 4
    assert _numbers(e["message"]) == [ctx, n_prompt + ctx - 4, n_prompt, ctx - 4]
    # max_tokens beyond the context minus the shortest prompt can never fit, whatever the prompt
    e = _err(http.post("/v1/chat/completions", json=_chat(model_name, max_tokens=ctx - 3)), 400, "max_tokens")
    assert e["code"] == "context_length_exceeded" and _numbers(e["message"]) == [ctx - 3, ctx, 4]
    e = _err(http.post("/v1/completions", json={"model": model_name, "prompt": "a", "max_tokens": ctx}), 400,
             "max_tokens")
    assert _numbers(e["message"]) == [ctx, ctx, 1]
    # the prompt alone is too long (generation): its length and the context
    prompt = "a " * (ctx + 5)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=model_name, prompt=prompt, max_tokens=1)
    n_text = len(tok.encode(prompt)) + 1  # + BOS
    assert _numbers(info.value.body["message"]) == [n_text, ctx]
    assert info.value.body["code"] == "context_length_exceeded" and n_text != ctx
    # scoring only (max_tokens=0): ctx + 1 ids + the BOS the server prepends
    e = _err(http.post("/v1/completions", json={"model": model_name, "prompt": [5] * (ctx + 1),
                                                 "max_tokens": 0, "echo": True, "logprobs": 0}), 400)
    assert _numbers(e["message"]) == [ctx + 2, ctx]


def test_unknown_model_route_and_method(client, http, model_name):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-9", prompt="a", max_tokens=1)
    _err(http.post("/v1/chat/completions", json=_chat("nope")), 404, "model")
    _err(http.get("/v1/models/nope"), 404)
    _err(http.post("/tokenize", json={"model": "nope", "prompt": "a"}), 404, "model")
    _err(http.post("/detokenize", json={"model": "nope", "tokens": [1]}), 404, "model")
    assert http.post("/tokenize", json={"model": model_name, "prompt": "a"}).status_code == 200
    _err(http.get("/v1/nothing-here"), 404)
    _err(http.get("/v1/completions"), 405)
    _err(http.delete("/v1/models"), 405)


def test_body_too_large(live, model_name):
    with httpx.Client(base_url=live.url, timeout=30) as h:
        big = json.dumps({"model": model_name, "prompt": "a" * 1_100_000}).encode()
        _err(h.post("/v1/completions", content=big, headers={"content-type": "application/json"}), 413)

        def chunks():  # no Content-Length: the server must count what it actually reads
            for _ in range(20):
                yield b" " * 100_000

        _err(h.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"}), 413)
    with httpx.Client(base_url=live.url, timeout=30) as h:  # the server still works afterwards
        assert h.get("/health").status_code == 200


def test_draining_gives_503(http, live, model_name):
    live.app.state.draining = True
    try:
        _err(http.post("/v1/chat/completions", json=_chat(model_name)), 503)
        assert http.get("/health").status_code == 503
    finally:
        live.app.state.draining = False


@pytest.fixture(scope="module")
def keyed(start_server):
    return start_server(api_key="s3cret", max_batch=2, max_queue=0)


def test_api_key(keyed):
    name = keyed.engine.model_name
    with httpx.Client(base_url=keyed.url) as h:
        _err(h.get("/v1/models"), 401)
        _err(h.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
        _err(h.get("/v1/models", headers={"Authorization": "s3cret"}), 401)
        assert h.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert h.get("/health").status_code == 200  # probes need no key
    bad = openai.OpenAI(base_url=keyed.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    good = openai.OpenAI(base_url=keyed.url + "/v1", api_key="s3cret", max_retries=0)
    assert good.models.list().data[0].id == name


def _counts(metrics_text: str, endpoint: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(metrics_text):
        if fam.name == "spud_http_requests":
            for smp in fam.samples:
                if smp.name.endswith("_total") and smp.labels["endpoint"] == endpoint:
                    out[smp.labels["status"]] = smp.value
    return out


def test_queue_full_is_429_and_never_fits_is_400(start_server):
    # the engine thread never runs: what is queued stays queued, as on a saturated server
    srv = start_server(start_engine=False, max_batch=1, max_queue=2)
    name, engine = srv.engine.model_name, srv.engine
    body = {"model": name, "prompt": "a", "max_tokens": 2}
    with httpx.Client(base_url=srv.url, timeout=30) as h:
        # more sequences than the queue can ever hold: 400 at once (retrying would not help)
        e = _err(h.post("/v1/completions", json={**body, "prompt": ["a", "b", "c"]}), 400, "prompt")
        assert e["code"] == "too_many_sequences" and _numbers(e["message"]) == [3, 3, 1, 2]
        e = _err(h.post("/v1/chat/completions", json=_chat(name, n=3)), 400, "n")
        assert _numbers(e["message"]) == [3, 1, 3, 2]
        assert engine.stats()["waiting"] == 0  # nothing was queued by the refused requests
        with h.stream("POST", "/v1/completions", json={**body, "stream": True}) as s1, \
                h.stream("POST", "/v1/completions", json={**body, "stream": True, "n": 1}) as s2:
            assert s1.status_code == s2.status_code == 200 and engine.stats()["waiting"] == 2
            r = h.post("/v1/completions", json=body)  # fits an empty queue, not this one
            e = _err(r, 429)
            assert e["code"] == "queue_full" and e["type"] == "rate_limit_error"
            assert r.headers["retry-after"] == "1"
            with pytest.raises(openai.RateLimitError):
                openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0).completions.create(**body)
        # the two streams are counted when the server has seen them hang up
        deadline = time.monotonic() + 15
        while "200" not in (counts := _counts(h.get("/metrics").text, "/v1/completions")) or counts["200"] < 2:
            assert time.monotonic() < deadline, counts
            time.sleep(0.05)
        assert counts == {"400": 1.0, "429": 2.0, "200": 2.0}
        assert _counts(h.get("/metrics").text, "/v1/chat/completions") == {"400": 1.0}
