"""/metrics through prometheus_client: per-app registries, exact histogram observations, the
engine's live numbers, and what one real request adds."""

from __future__ import annotations

import threading
import time

import pytest
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from spud.serve.metrics import ServerMetrics, TokenTimer


class FakeEngine:
    max_batch, max_queue = 8, 32

    def __init__(self, **stats):
        self._stats = stats

    def stats(self):
        return dict(self._stats)


def _value(m: ServerMetrics, name: str, **labels) -> float | None:
    return m.registry.get_sample_value(name, labels)


def test_each_app_has_its_own_registry():
    a, b = ServerMetrics(FakeEngine(running=1)), ServerMetrics(FakeEngine(running=2))  # no clash
    a.requests.labels("/v1/completions", "200").inc()
    a.record_request("/v1/completions", 7, 3, time.perf_counter())
    assert _value(a, "spud_http_requests_total", endpoint="/v1/completions", status="200") == 1
    assert _value(b, "spud_http_requests_total", endpoint="/v1/completions", status="200") is None
    assert (_value(a, "spud_prompt_tokens_total"), _value(a, "spud_completion_tokens_total")) == (7, 3)
    assert _value(b, "spud_prompt_tokens_total") == 0
    assert (_value(a, "spud_num_requests_running"), _value(b, "spud_num_requests_running")) == (1, 2)
    assert b"spud_" not in generate_latest(REGISTRY)  # the library's global registry is untouched


def test_token_timer_records_ttft_queue_and_inter_token_exactly():
    m = ServerMetrics()
    clock = iter([2.0, 2.125, 2.375]).__next__

    class Handle:
        submitted, admitted = 1.0, 1.25

    timer = TokenTimer(m, "/v1/chat/completions", 0.5, Handle(), clock=clock)
    for _ in range(3):
        timer.token()
    ep = {"endpoint": "/v1/chat/completions"}
    assert _value(m, "spud_time_to_first_token_seconds_sum", **ep) == 1.5
    assert _value(m, "spud_time_to_first_token_seconds_count", **ep) == 1
    assert _value(m, "spud_request_queue_time_seconds_sum", **ep) == 0.25
    assert _value(m, "spud_inter_token_latency_seconds_count", **ep) == 2
    assert _value(m, "spud_inter_token_latency_seconds_sum", **ep) == 0.375
    # buckets are cumulative: 0.125 and 0.25 are both <= 0.25, only 0.125 is <= 0.15
    assert _value(m, "spud_inter_token_latency_seconds_bucket", le="0.15", **ep) == 1
    assert _value(m, "spud_inter_token_latency_seconds_bucket", le="0.25", **ep) == 2
    # a handle without engine stamps has no queue time (rather than a made-up one)
    TokenTimer(m, "/v1/completions", 0.0, object(), clock=iter([1.0]).__next__).token()
    assert _value(m, "spud_request_queue_time_seconds_count", endpoint="/v1/completions") is None
    assert _value(m, "spud_time_to_first_token_seconds_count", endpoint="/v1/completions") == 1


def test_engine_numbers_are_read_at_scrape_time():
    engine = FakeEngine(running=3, waiting=2, requests_total=7, cancelled_total=1,
                        prefix_cache_hits_total=5, cache_blocks_used=9, label="not a number")
    m = ServerMetrics(engine)
    text = m.render()[0].decode()
    assert "# TYPE spud_num_requests_running gauge" in text and "# TYPE spud_engine_requests_total counter" in text
    assert _value(m, "spud_num_requests_running") == 3 and _value(m, "spud_num_requests_waiting") == 2
    assert _value(m, "spud_engine_requests_total") == 7 and _value(m, "spud_engine_cancelled_total") == 1
    # keys the server does not know yet are still exported: counters by their _total suffix
    assert _value(m, "spud_engine_prefix_cache_hits_total") == 5
    assert _value(m, "spud_engine_cache_blocks_used") == 9
    assert (_value(m, "spud_engine_slots"), _value(m, "spud_engine_max_queue")) == (8, 32)
    engine._stats["running"] = 0
    assert _value(m, "spud_num_requests_running") == 0  # live, not a copy


# ------------------------------------------------------------------------------- live server
def _samples(text: str) -> dict:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _get(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_one_request_adds_exactly_its_numbers(http, live, model_name):
    tok = live.engine.tokenizer
    ep = "/v1/completions"
    before = _samples(http.get("/metrics").text)
    k = 6
    body = {"model": model_name, "prompt": "count", "max_tokens": k, "temperature": 0, "n": 2,
            "logit_bias": {str(tok.eos_id): -100, str(tok.end_id): -100, str(tok.bos_id): -100}}
    r = http.post(ep, json=body).json()
    assert r["usage"]["completion_tokens"] == 2 * k
    deadline = time.monotonic() + 10
    while True:  # the request counter is updated once the response has gone out
        after = _samples(http.get("/metrics").text)
        if _get(after, "spud_http_requests_total", endpoint=ep, status="200") > \
                _get(before, "spud_http_requests_total", endpoint=ep, status="200") or time.monotonic() > deadline:
            break
        time.sleep(0.05)

    def delta(name, **labels):
        return _get(after, name, **labels) - _get(before, name, **labels)

    n_prompt = len(tok.encode("count")) + 1
    assert delta("spud_http_requests_total", endpoint=ep, status="200") == 1
    assert delta("spud_prompt_tokens_total") == n_prompt
    assert delta("spud_completion_tokens_total") == 2 * k
    assert delta("spud_time_to_first_token_seconds_count", endpoint=ep) == 2  # one per choice
    assert delta("spud_request_queue_time_seconds_count", endpoint=ep) == 2
    assert delta("spud_inter_token_latency_seconds_count", endpoint=ep) == 2 * (k - 1)
    assert delta("spud_e2e_request_latency_seconds_count", endpoint=ep) == 1
    assert delta("spud_engine_requests_total") == 2
    assert _get(after, "spud_num_requests_running") == 0 and _get(after, "spud_num_requests_waiting") == 0
    assert _get(after, "spud_engine_slots") == live.engine.max_batch


def test_busy_slots_gauge_during_a_stream(http, live, model_name, monkeypatch):
    tok, engine = live.engine.tokenizer, live.engine
    decode_step, scraped = engine._decode_step, threading.Event()

    def held_step():  # a tiny model finishes 50 tokens faster than one scrape: hold the decode
        scraped.wait(10)  # steps (the first token comes from the prefill) until /metrics was read
        decode_step()

    monkeypatch.setattr(engine, "_decode_step", held_step)
    body = {"model": model_name, "prompt": "a", "max_tokens": 50, "temperature": 0, "stream": True,
            "logit_bias": {str(tok.eos_id): -100, str(tok.end_id): -100}}
    with http.stream("POST", "/v1/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break
        during = _samples(http.get("/metrics").text)
        scraped.set()
    monkeypatch.undo()
    assert _get(during, "spud_num_requests_running") == 1, during
    deadline = time.monotonic() + 10
    while live.engine.stats()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _get(_samples(http.get("/metrics").text), "spud_num_requests_running") == 0


@pytest.mark.parametrize("accept,kind,ending", [
    (None, "text/plain", None),
    ("application/openmetrics-text; version=1.0.0", "application/openmetrics-text", "# EOF\n"),
])
def test_exposition_formats(http, accept, kind, ending):
    r = http.get("/metrics", headers={"accept": accept} if accept else {})
    assert r.status_code == 200 and r.headers["content-type"].startswith(kind)
    assert "spud_time_to_first_token_seconds" in r.text
    if ending:
        assert r.text.endswith(ending)
