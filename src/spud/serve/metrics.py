"""Prometheus text exposition (format 0.0.4) for the server, without a client library.

Only what /metrics needs: labelled counters and histograms kept in this process, plus gauges read
from the engine at scrape time (the engine owns its queue, so copying its numbers into our own
gauges would only let them drift). A lock guards updates because handlers run on the event loop
while stream generators may finish from cancellation callbacks.
"""

from __future__ import annotations

import math
import threading
import time
from collections import defaultdict

# Seconds. CPU decoding of a tiny model is milliseconds, a big model on GPU is seconds: the range
# has to cover both for the histograms to say anything.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(x: float) -> str:
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return repr(float(x)) if not float(x).is_integer() else str(int(x))


class Counter:
    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()):
        self.name, self.help, self.labels = name, help, labels
        self._values: dict[tuple[str, ...], float] = defaultdict(float)
        self._lock = threading.Lock()

    def inc(self, *label_values: str, amount: float = 1.0) -> None:
        with self._lock:
            self._values[tuple(label_values)] += amount

    def get(self, *label_values: str) -> float:
        return self._values.get(tuple(label_values), 0.0)

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        with self._lock:
            items = sorted(self._values.items())
        if not items and not self.labels:
            items = [((), 0.0)]  # an unlabelled counter exists from the start
        out += [f"{self.name}{_labels(self.labels, k)} {_num(v)}" for k, v in items]
        return out


class Histogram:
    def __init__(self, name: str, help: str, labels: tuple[str, ...] = (), buckets=LATENCY_BUCKETS):
        self.name, self.help, self.labels = name, help, labels
        self.buckets = tuple(sorted(buckets))
        # per label set: [count per bucket (non-cumulative)..., +Inf bucket], sum
        self._series: dict[tuple[str, ...], tuple[list[int], list[float]]] = {}
        self._lock = threading.Lock()

    def observe(self, value: float, *label_values: str) -> None:
        with self._lock:
            counts, total = self._series.setdefault(
                tuple(label_values), ([0] * (len(self.buckets) + 1), [0.0])
            )
            i = next((j for j, b in enumerate(self.buckets) if value <= b), len(self.buckets))
            counts[i] += 1
            total[0] += value

    def count(self, *label_values: str) -> int:
        s = self._series.get(tuple(label_values))
        return sum(s[0]) if s else 0

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        with self._lock:
            items = sorted((k, (list(c), t[0])) for k, (c, t) in self._series.items())
        for key, (counts, total) in items:
            cum = 0
            for b, c in zip((*self.buckets, math.inf), counts):
                cum += c
                le = 'le="' + _num(b) + '"'
                out.append(f"{self.name}_bucket{_labels(self.labels, key, le)} {cum}")
            out.append(f"{self.name}_sum{_labels(self.labels, key)} {_num(total)}")
            out.append(f"{self.name}_count{_labels(self.labels, key)} {cum}")
        return out


class ServerMetrics:
    """Everything the API records, plus the engine's live numbers at render time."""

    def __init__(self):
        self.requests = Counter(
            "spud_http_requests_total", "HTTP requests by endpoint and status code.", ("endpoint", "status")
        )
        self.prompt_tokens = Counter("spud_prompt_tokens_total", "Prompt tokens processed.")
        self.completion_tokens = Counter("spud_completion_tokens_total", "Completion tokens generated.")
        self.ttft = Histogram(
            "spud_time_to_first_token_seconds", "Request arrival to first generated token.", ("endpoint",)
        )
        self.e2e = Histogram(
            "spud_e2e_request_latency_seconds", "Request arrival to last token.", ("endpoint",)
        )

    def render(self, engine_stats: dict | None) -> str:
        lines: list[str] = []
        for m in (self.requests, self.prompt_tokens, self.completion_tokens, self.ttft, self.e2e):
            lines += m.render()
        stats = engine_stats or {}
        gauges = [
            ("spud_num_requests_running", "Sequences currently decoding in the engine.", "running"),
            ("spud_num_requests_waiting", "Requests queued for a free engine slot.", "waiting"),
        ]
        for name, help, key in gauges:
            lines += [f"# HELP {name} {help}", f"# TYPE {name} gauge", f"{name} {_num(stats.get(key, 0))}"]
        engine_counters = [
            ("spud_engine_requests_total", "Requests the engine accepted.", "requests_total"),
            ("spud_engine_cancelled_total", "Requests cancelled (client gone or shutdown).", "cancelled_total"),
        ]
        for name, help, key in engine_counters:
            lines += [f"# HELP {name} {help}", f"# TYPE {name} counter", f"{name} {_num(stats.get(key, 0))}"]
        return "\n".join(lines) + "\n"

    def record_request(self, endpoint: str, prompt_tokens: int, completion_tokens: int, t0: float) -> None:
        """Called once per finished generation request; t0 is its time.perf_counter() arrival."""
        self.prompt_tokens.inc(amount=prompt_tokens)
        self.completion_tokens.inc(amount=completion_tokens)
        self.e2e.observe(time.perf_counter() - t0, endpoint)
