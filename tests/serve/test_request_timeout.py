"""Per-request timeout (Engine request_timeout, `spud serve --request-timeout`): a request still
unfinished after the timeout ends with reason "timeout" wherever it is (decoding or queued), its
slot is free at once, and the API answers an OpenAI-shaped 408 (in-band when streaming)."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
import torch

from spud.config import ModelConfig, TokenizerConfig
from spud.errors import SpudError
from spud.model.registry import build_model
from spud.serve.engine import Engine, SamplingParams
from spud.tokenizer import train_tokenizer

from engine_timing import slow_down


@pytest.fixture(scope="module")
def small():
    tok = train_tokenizer(iter(["the quick brown fox jumps over the lazy dog. " * 3] * 20),
                          TokenizerConfig(vocab_size=300, min_frequency=1))
    torch.manual_seed(0)
    model = build_model(ModelConfig(d_model=32, n_layers=1, n_heads=2, vocab_size=tok.vocab_size,
                                    max_seq_len=256)).eval()
    return model, tok


def test_running_and_queued_requests_time_out_and_free_their_slot(small):
    model, tok = small
    eng = Engine(model, tok, max_batch=1, request_timeout=0.5)
    slow_down(eng, 0.02)
    eng.start()
    try:
        t0 = time.perf_counter()
        long = eng.submit([5, 6, 7], SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
        queued = eng.submit([5, 6, 8], SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
        for h in (long, queued):
            text, toks, fin = h.result()
            assert fin.reason == "timeout" and "request timeout of 0.5 s" in fin.error
        took = time.perf_counter() - t0
        assert 0.5 <= took < 10.0, took  # both end at the first step after 0.5 s (loaded CI: slack)
        assert eng.stats()["running"] == 0 and eng._free == [0]
        # the slot serves the next request normally
        _, toks, fin = eng.submit([5], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)).result()
        assert fin.reason == "length" and len(toks) == 3
    finally:
        eng.shutdown(abort=True)


def test_bad_timeout_is_a_clear_error(small):
    with pytest.raises(SpudError, match="request_timeout must be > 0"):
        Engine(*small, request_timeout=0)


def test_http_timeout_is_408_streaming_and_not(start_server, model_name):
    srv = start_server(request_timeout=0.4)
    slow_down(srv.engine, 0.05)
    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0)
    no_end = {str(i): -100 for i in srv.engine.end_ids}  # never stop early: run into the timeout
    kw = {"model": model_name, "prompt": "the", "max_tokens": 40, "temperature": 0, "logit_bias": no_end}
    with pytest.raises(openai.APIStatusError) as err:
        client.completions.create(**kw)
    assert err.value.status_code == 408
    body = err.value.body
    assert body["type"] == "timeout_error" and body["code"] == "request_timeout"
    assert "--request-timeout" in body["message"]
    # streaming: the headers are sent, so the error comes in-band, then [DONE]
    with httpx.stream("POST", f"{srv.url}/v1/completions", timeout=30,
                      json={"model": model_name, "prompt": "the", "max_tokens": 40, "stream": True,
                            "logit_bias": no_end, "temperature": 0}) as r:
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    last = json.loads(lines[-2][6:])
    assert last["error"]["code"] == "request_timeout" and last["error"]["type"] == "timeout_error"
    assert srv.engine.stats()["running"] == 0
    # a short request still works on the same server
    assert client.completions.create(**{**kw, "max_tokens": 2}).choices[0].finish_reason == "length"
