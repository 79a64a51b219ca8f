"""Load: 64 streaming clients at once, half of them hanging up mid-stream (issue 14's check).
Every kept stream completes with [DONE] and no error, the server answers no 5xx, every slot is
free afterwards and the process's RSS is back within 10 % of its value before the load.
A longer, out-of-process version (a real `spud serve`, many rounds): benchmarks/serve_load.py."""

from __future__ import annotations

import asyncio
import gc
import json
import re
import time
from pathlib import Path

import httpx

CLIENTS = 64
MAX_TOKENS = 12  # short streams keep this under ~10 s; benchmarks/serve_load.py runs long ones


def rss_bytes() -> int | None:
    status = Path("/proc/self/status")
    if not status.exists():
        return None
    m = re.search(r"VmRSS:\s+(\d+) kB", status.read_text())
    return int(m.group(1)) * 1024 if m else None


async def one_client(url: str, body: dict, hang_up_after: int | None) -> dict:
    """Stream one completion; hang_up_after = N: close the connection after N chunks."""
    chunks, errors = 0, []
    async with httpx.AsyncClient(base_url=url, timeout=60) as c, \
            c.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return {"status": r.status_code, "done": False, "chunks": 0, "errors": [await r.aread()]}
        done = False
        async for line in r.aiter_lines():
            if not line:
                continue
            if line == "data: [DONE]":
                done = True
                break
            event = json.loads(line[6:])
            if "error" in event:
                errors.append(event["error"])
            chunks += 1
            if hang_up_after is not None and chunks >= hang_up_after:
                break  # leaving the block closes the connection mid-stream
    return {"status": 200, "done": done, "chunks": chunks, "errors": errors}


async def load_round(url: str, model: str, no_end: dict) -> list[dict]:
    body = {"model": model, "prompt": "the quick brown", "max_tokens": MAX_TOKENS, "temperature": 0.8,
            "stream": True, "logit_bias": no_end}
    return await asyncio.gather(*[
        one_client(url, {**body, "seed": i}, hang_up_after=3 if i % 2 else None)
        for i in range(CLIENTS)])


def server_5xx(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return sum(float(m.group(1)) for m in re.finditer(
        r'^spud_http_requests_total\{[^}]*status="5\d\d"[^}]*\} (\S+)$', text, re.M))


def test_64_streams_half_disconnect(start_server):
    # one round ~13 s on 2 loaded cores (load average 9); with speculation on, long streams and
    # several rounds: python benchmarks/serve_load.py RUN [--speculate 4]
    srv = start_server(max_batch=16, max_queue=CLIENTS)
    eng = srv.engine
    no_end = {str(i): -100 for i in eng.end_ids}  # every kept stream runs to max_tokens
    asyncio.run(load_round(srv.url, eng.model_name, no_end))  # warm-up: allocator pools, caches
    gc.collect()
    before = rss_bytes()
    t0 = time.perf_counter()
    results = asyncio.run(load_round(srv.url, eng.model_name, no_end))
    took = time.perf_counter() - t0
    kept = results[0::2]
    assert all(r["status"] == 200 for r in results)
    assert all(r["done"] and not r["errors"] and r["chunks"] == MAX_TOKENS + 1 for r in kept), kept[:3]
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
    assert took < 60
