"""Prometheus metrics for the server, through `prometheus_client`.

Each app gets its own CollectorRegistry (never the library's global one): tests start several
apps in one process, and two servers in one process must not share or double-register series.
What the HTTP layer observes (requests, tokens, latencies) is recorded into library Counters
and Histograms as it happens; what the engine owns (busy slots, waiting queue, its own
counters) is read from `engine.stats()` at scrape time by a custom collector, because copying
the engine's numbers into our own gauges would only let them drift.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import choose_encoder

# Seconds. CPU decoding of a tiny model is milliseconds, a big model on GPU is seconds: the range
# has to cover both for the histograms to say anything.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Between two tokens of one stream: sub-millisecond (batched GPU decode) up to a stalled second.
INTER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5,
                       1.0, 2.5)

# engine.stats() key → (metric name, help, kind). Keys not listed here are still exported
# (see _EngineCollector), so a new engine counter shows up without touching this file.
ENGINE_SERIES = {
    "running": ("spud_num_requests_running", "Sequences decoding in the engine (busy slots).", "gauge"),
    "waiting": ("spud_num_requests_waiting", "Requests queued for a free engine slot.", "gauge"),
    "requests_total": ("spud_engine_requests", "Requests the engine accepted.", "counter"),
    "cancelled_total": ("spud_engine_cancelled", "Requests cancelled (client gone or shutdown).",
                        "counter"),
    "prompt_tokens_total": ("spud_engine_prompt_tokens", "Prompt tokens the engine accepted.",
                            "counter"),
    "completion_tokens_total": ("spud_engine_generated_tokens",
                                "Tokens the engine generated (including cancelled requests).",
                                "counter"),
}


class _EngineCollector:
    """Reads the engine's live numbers once per scrape."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        stats = self.engine.stats() or {}
        for key, value in sorted(stats.items()):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            name, help, kind = ENGINE_SERIES.get(key) or _generic_series(key)
            if kind == "counter":
                yield CounterMetricFamily(name, help, value=value)
            else:
                yield GaugeMetricFamily(name, help, value=value)
        for attr, name, help in (("max_batch", "spud_engine_slots", "Sequence slots (max_batch)."),
                                 ("max_queue", "spud_engine_max_queue", "Waiting-queue limit.")):
            value = getattr(self.engine, attr, None)
            if isinstance(value, int):
                yield GaugeMetricFamily(name, help, value=value)


def _generic_series(key: str) -> tuple[str, str, str]:
    if key.endswith("_total"):
        return f"spud_engine_{key[:-len('_total')]}", f"Engine counter {key!r}.", "counter"
    return f"spud_engine_{key}", f"Engine value {key!r}.", "gauge"


class ServerMetrics:
    """Everything the API records, in one per-app registry, plus the engine's live numbers."""

    def __init__(self, engine=None):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("spud_http_requests", "HTTP requests by endpoint and status code.",
                                ("endpoint", "status"), registry=r)
        self.prompt_tokens = Counter("spud_prompt_tokens", "Prompt tokens of finished requests.",
                                     registry=r)
        self.completion_tokens = Counter("spud_completion_tokens",
                                         "Tokens generated for finished requests.", registry=r)
        self.ttft = Histogram("spud_time_to_first_token_seconds",
                              "Request arrival to its first generated token.", ("endpoint",),
                              buckets=LATENCY_BUCKETS, registry=r)
        self.inter_token = Histogram("spud_inter_token_latency_seconds",
                                     "Time between consecutive tokens of one choice.", ("endpoint",),
                                     buckets=INTER_TOKEN_BUCKETS, registry=r)
        self.queue_time = Histogram("spud_request_queue_time_seconds",
                                    "Engine submission to admission into a slot (prefill start).",
                                    ("endpoint",), buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("spud_e2e_request_latency_seconds", "Request arrival to its last token.",
                             ("endpoint",), buckets=LATENCY_BUCKETS, registry=r)
        if engine is not None:
            r.register(_EngineCollector(engine))

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """(body, content type): Prometheus text, or OpenMetrics when the scraper asks for it."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type

    def record_request(self, endpoint: str, prompt_tokens: int, completion_tokens: int, t0: float) -> None:
        """Called once per finished generation request; t0 is its time.perf_counter() arrival."""
        self.prompt_tokens.inc(prompt_tokens)
        self.completion_tokens.inc(completion_tokens)
        self.e2e.labels(endpoint).observe(time.perf_counter() - t0)


class TokenTimer:
    """Per-choice timing as events arrive: TTFT and queue time at the first token, inter-token
    latency for every later one. `handle` may expose `submitted`/`admitted` perf_counter()
    stamps (the engine sets them); without them there is no queue time to report."""

    def __init__(self, metrics: ServerMetrics, endpoint: str, t0: float, handle=None,
                 clock: Callable[[], float] = time.perf_counter):
        self.metrics, self.endpoint, self.t0, self.handle, self.clock = metrics, endpoint, t0, handle, clock
        self.last: float | None = None

    def token(self) -> None:
        now = self.clock()
        if self.last is None:
            self.metrics.ttft.labels(self.endpoint).observe(now - self.t0)
            submitted = getattr(self.handle, "submitted", None)
            admitted = getattr(self.handle, "admitted", None)
            if submitted is not None and admitted is not None:
                self.metrics.queue_time.labels(self.endpoint).observe(max(admitted - submitted, 0.0))
        else:
            self.metrics.inter_token.labels(self.endpoint).observe(now - self.last)
        self.last = now
