"""Load: 64 streaming clients at once, half of them hanging up mid-stream (issue 14's check).
Every kept stream completes with [DONE] and no error, the server answers no 5xx, every slot is
free afterwards and the process's RSS is back within 10 % of its value before the load.
A longer, out-of-process version (a real `spud serve`, many rounds): benchmarks/serve_load.py."""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import re
import time
from pathlib import Path

import httpx

BENCH = Path(__file__).parents[2] / "benchmarks" / "serve_load.py"  # the load's client side
CLIENTS = 64
MAX_TOKENS = 12  # short kept streams; benchmarks/serve_load.py runs long ones, several rounds
HANG_UP_TOKENS = 50  # the leaving clients ask for many (context 64): still running when they go


def rss_bytes() -> int | None:
    status = Path("/proc/self/status")
    if not status.exists():
        return None
    m = re.search(r"VmRSS:\s+(\d+) kB", status.read_text())
    return int(m.group(1)) * 1024 if m else None


def _bench():
    spec = importlib.util.spec_from_file_location("serve_load_bench", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def server_5xx(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return sum(float(m.group(1)) for m in re.finditer(
        r'^spud_http_requests_total\{[^}]*status="5\d\d"[^}]*\} (\S+)$', text, re.M))


def test_64_streams_half_disconnect(start_server):
    # two rounds: ~13 s on 2 cores at load average 9 (75 s at 15); long streams, several rounds,
    # speculation on, a separate server process: python benchmarks/serve_load.py RUN
    srv = start_server(max_batch=16, max_queue=CLIENTS)
    eng = srv.engine
    no_end = {str(i): -100 for i in eng.end_ids}  # every kept stream runs to max_tokens
    bench = _bench()
    load = (srv.url, eng.model_name, CLIENTS, MAX_TOKENS, no_end, HANG_UP_TOKENS)
    asyncio.run(asyncio.wait_for(bench.load_round(*load), 300))  # warm-up: allocator pools, caches
    gc.collect()
    before = rss_bytes()
    results = asyncio.run(asyncio.wait_for(bench.load_round(*load), 300))  # bounded
    assert bench.check_round(results, MAX_TOKENS) == []
    assert all(r["chunks"] == 3 for r in results[1::2])
    deadline = time.monotonic() + 20
    while (eng.stats()["running"] or eng.stats()["waiting"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert eng.stats()["running"] == 0 and eng.stats()["waiting"] == 0
    assert sorted(eng._free) == list(range(eng.max_batch))  # every slot back in the free list
    assert eng.stats()["cancelled_total"] >= CLIENTS  # the hung-up streams of both rounds
    assert server_5xx(srv.url) == 0
    gc.collect()
    after = rss_bytes()
    if before is not None:
        assert after <= before * 1.10, (before, after)
