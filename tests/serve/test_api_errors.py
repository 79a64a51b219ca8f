"""Every error class in OpenAI's shape, and no 500 for any bad input."""

from __future__ import annotations

import json

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


def test_context_length_states_both_numbers(client, http, model_name, live):
    ctx = live.engine.max_context
    e = _err(http.post("/v1/chat/completions", json=_chat(model_name, max_tokens=ctx)), 400)
    assert str(ctx) in e["message"] and str(ctx) in e["message"] and e["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=model_name, prompt="a " * (ctx + 5), max_tokens=1)
    e = _err(http.post("/v1/completions", json={"model": model_name, "prompt": [5] * (ctx + 1),
                                                 "max_tokens": 0, "echo": True, "logprobs": 0}), 400)
    assert str(ctx) in e["message"] and str(ctx + 2) in e["message"]


def test_unknown_model_route_and_method(client, http, model_name):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-9", prompt="a", max_tokens=1)
    _err(http.post("/v1/chat/completions", json=_chat("nope")), 404, "model")
    _err(http.get("/v1/models/nope"), 404)
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


def test_queue_full_is_429(keyed):
    # max_queue=0: the engine refuses every submission, as a saturated one would
    good = openai.OpenAI(base_url=keyed.url + "/v1", api_key="s3cret", max_retries=0)
    with pytest.raises(openai.RateLimitError):
        good.completions.create(model=keyed.engine.model_name, prompt="a", max_tokens=2)
    with httpx.Client(base_url=keyed.url) as h:
        text = h.get("/metrics").text
    assert 'spud_http_requests_total{endpoint="/v1/completions",status="429"} 1' in text
    assert 'status="500"' not in text
