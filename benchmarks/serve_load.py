"""Load with disconnects against a real `spud serve` process: rounds of 64 streaming clients of
which half hang up mid-stream. Checks, per round and at the end: every kept stream ends with
[DONE] and no error, the server answered no 5xx (its /metrics), every slot is free afterwards
(running = waiting = 0), and the server process's RSS is back within 10 % of its value before
any load (also shown: relative to after the warm-up round). Bounded: a fixed number of rounds, each with a deadline; the server is
stopped at the end (SIGTERM, as a user would).

    python benchmarks/serve_load.py RUN [--rounds 5] [--clients 64] [--max-tokens 48] [--speculate 4]

tests/serve/test_serve_load.py runs one short in-process round of the same load (its helpers
are these: one_client, load_round).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from spud.tokenizer import Tokenizer


async def one_client(url: str, body: dict, hang_up_after: int | None) -> dict:
    """Stream one /v1/completions request; hang_up_after = N closes the connection after N
    chunks (a client going away mid-stream)."""
    chunks, errors = 0, []
    async with httpx.AsyncClient(base_url=url, timeout=120) as c, \
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


async def load_round(url: str, model: str, clients: int, max_tokens: int, no_end: dict,
                     hang_up_tokens: int | None = None) -> list[dict]:
    """`clients` concurrent sampled streams; the odd-numbered ones ask for hang_up_tokens
    (default max_tokens: long, so they are still running when they go) and hang up after 3
    chunks."""
    body = {"model": model, "prompt": "the quick brown", "temperature": 0.8, "stream": True,
            "logit_bias": no_end}
    return await asyncio.gather(*[
        one_client(url, {**body, "seed": i, "max_tokens": (hang_up_tokens or max_tokens) if i % 2 else max_tokens},
                   hang_up_after=3 if i % 2 else None)
        for i in range(clients)])


def check_round(results: list[dict], max_tokens: int) -> list[str]:
    """Problems seen by the clients (empty = fine)."""
    bad = [f"client {i}: HTTP {r['status']}" for i, r in enumerate(results) if r["status"] != 200]
    for i, r in enumerate(results[0::2]):
        if not r["done"] or r["errors"] or r["chunks"] != max_tokens + 1:
            bad.append(f"kept client {2 * i}: done={r['done']} chunks={r['chunks']} errors={r['errors']}")
    return bad


def metric(text: str, name: str, label: str = "") -> float:
    return sum(float(m.group(1)) for m in re.finditer(
        rf"^{name}(?:\{{[^}}]*{label}[^}}]*\}})? (\S+)$", text, re.M))


def rss_of(pid: int) -> int:
    m = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return int(m.group(1)) * 1024


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--speculate", type=int, default=0)
    p.add_argument("--round-timeout", type=float, default=300)
    p.add_argument("--out", default="benchmarks/results/serve_load.json")
    args = p.parse_args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "spud.cli", "serve", args.run, "--port", str(port), "--device", "cpu",
           "--max-batch", str(args.max_batch), "--max-queue", str(args.clients),
           "--speculate", str(args.speculate)]
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    report: dict = {"args": vars(args), "rounds": [], "loadavg_before": os.getloadavg()}
    ok = True
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                print(server.stdout.read() if server.poll() is not None else "", file=sys.stderr)
                raise SystemExit("the server did not start")
            time.sleep(0.2)
        model = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
        # every kept stream runs to max_tokens: the run's end tokens are biased away
        tok = Tokenizer.load(Path(args.run) / "tokenizer.json")
        no_end = {str(i): -100 for i in (tok.end_id, tok.eos_id, tok.bos_id) if i is not None}
        preload = rss_of(server.pid)  # started, model loaded, no request served yet
        report["rss_preload_mb"] = preload / 2**20
        baseline = None
        for r in range(args.rounds + 1):  # round 0 warms up (allocator pools, caches)
            t0 = time.perf_counter()
            results = asyncio.run(asyncio.wait_for(
                load_round(url, model, args.clients, args.max_tokens, no_end), args.round_timeout))
            took = time.perf_counter() - t0
            settle = time.monotonic() + 30
            while True:
                text = httpx.get(f"{url}/metrics", timeout=10).text
                busy = metric(text, "spud_num_requests_running") + metric(text, "spud_num_requests_waiting")
                if busy == 0 or time.monotonic() > settle:
                    break
                time.sleep(0.1)
            rss = rss_of(server.pid)
            baseline = baseline or rss
            row = {"round": r, "seconds": took, "problems": check_round(results, args.max_tokens),
                   "busy_slots_after": busy, "http_5xx_total": metric(text, "spud_http_requests_total", 'status="5'),
                   "cancelled_total": metric(text, "spud_engine_cancelled_total"),
                   "rss_mb": rss / 2**20, "rss_vs_warm": rss / baseline, "rss_vs_preload": rss / preload}
            # issue 14's bar: back within 10 % of the pre-load RSS after every round
            good = not row["problems"] and busy == 0 and row["http_5xx_total"] == 0 and rss <= 1.10 * preload
            ok &= good
            report["rounds"].append(row)
            print(f"round {r}{' (warm-up)' if r == 0 else ''}: {took:6.1f} s  problems {len(row['problems'])}  "
                  f"busy after {busy:g}  5xx {row['http_5xx_total']:g}  cancelled {row['cancelled_total']:g}  "
                  f"RSS {row['rss_mb']:.0f} MB ({row['rss_vs_preload']:.3f}x pre-load, "
                  f"{row['rss_vs_warm']:.3f}x warm)  {'ok' if good else 'FAIL'}",
                  flush=True)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    report["loadavg_after"] = os.getloadavg()
    report["ok"] = ok
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"{'all rounds ok' if ok else 'FAILED'}; load average {report['loadavg_before'][0]:.2f} -> "
          f"{report['loadavg_after'][0]:.2f}; wrote {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
