"""Streaming (SSE) behaviour: framing, usage chunk, concurrency, and client disconnects."""

from __future__ import annotations

import asyncio
import json
import time

from engine_timing import slow_down

CHAT = [{"role": "user", "content": "Count: 1, 2, 3,"}]


def _events(http, path, body) -> list:
    with http.stream("POST", path, json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert all(ln.startswith("data: ") for ln in lines)
    assert lines[-1] == "data: [DONE]"
    return [json.loads(ln[6:]) for ln in lines[:-1]]


def test_chat_stream_framing(http, model_name):
    body = {"model": model_name, "messages": CHAT, "max_tokens": 6, "temperature": 0}
    ref = http.post("/v1/chat/completions", json=body).json()["choices"][0]
    chunks = _events(http, "/v1/chat/completions", {**body, "stream": True})
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["finish_reason"] == ref["finish_reason"]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == ref["message"]["content"]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert all("usage" not in c for c in chunks)  # no usage unless asked for
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)


def test_stream_include_usage_matches_non_stream(client, model_name):
    kw = {"model": model_name, "messages": CHAT, "max_tokens": 6, "temperature": 0}
    ref = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == ref.usage.total_tokens
    assert chunks[-2].choices[0].finish_reason == ref.choices[0].finish_reason


def test_completion_stream_n2(client, model_name):
    kw = {"model": model_name, "prompt": "x = 1\n", "max_tokens": 5, "temperature": 0}
    ref = client.completions.create(**kw).choices[0].text
    texts = {0: "", 1: ""}
    finishes = {}
    for c in client.completions.create(stream=True, n=2, **kw):
        for ch in c.choices:
            texts[ch.index] += ch.text
            if ch.finish_reason:
                finishes[ch.index] = ch.finish_reason
    assert texts == {0: ref, 1: ref} and set(finishes) == {0, 1}


def test_32_concurrent_streams_match_sequential(client, aclient, model_name):
    prompts = [f"{i} + {i} = " for i in range(32)]
    kw = {"model": model_name, "max_tokens": 8, "temperature": 0}
    sequential = [client.completions.create(prompt=p, **kw).choices[0].text for p in prompts]

    async def one(p):
        out = ""
        async for c in await aclient.completions.create(prompt=p, stream=True, **kw):
            out += c.choices[0].text if c.choices else ""
        return out

    async def main():
        return await asyncio.gather(*(one(p) for p in prompts))

    assert asyncio.run(main()) == sequential


def test_dropped_client_frees_slot(http, live, model_name, monkeypatch):
    engine = live.engine
    before = engine.stats()["cancelled_total"]
    slow_down(engine, 0.02, monkeypatch)  # else 60 tokens are done before the hang-up lands
    body = {"model": model_name, "prompt": "a", "max_tokens": 60, "temperature": 0, "stream": True,
            "logit_bias": {str(engine.tokenizer.eos_id): -100, str(engine.tokenizer.end_id): -100}}
    with http.stream("POST", "/v1/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # got the first token: now hang up
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        s = engine.stats()
        if s["running"] == 0 and s["waiting"] == 0 and s["cancelled_total"] > before:
            break
        time.sleep(0.05)
    s = engine.stats()
    assert s["running"] == 0 and s["cancelled_total"] == before + 1
    assert "spud_engine_cancelled_total" in http.get("/metrics").text


def test_serve_sigterm_drains_then_exits(serve_run):
    """`serve()` in its own process: SIGTERM lets the in-flight stream finish, then it exits."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = (f"from spud.serve.server import serve; "
            f"serve({str(serve_run)!r}, '127.0.0.1', {port}, None, 4, 8, None, 'cpu')")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "server did not start"
            time.sleep(0.1)
        name = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        body = {"model": name, "prompt": "a", "max_tokens": 40, "stream": True, "temperature": 0}
        lines = []
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
            for line in r.iter_lines():
                if not lines:
                    proc.send_signal(signal.SIGTERM)
                lines.append(line)
        assert [ln for ln in lines if ln][-1] == "data: [DONE]"  # drained, not cut off
        out, _ = proc.communicate(timeout=30)
        # uvicorn re-raises the signal after its clean shutdown, so "killed by SIGTERM" is the norm
        assert proc.returncode in (0, -signal.SIGTERM), out
        assert "Finished server process" in out and "Traceback" not in out
        assert f"{url}/v1" in out and name in out and "curl" in out
    finally:
        if proc.poll() is None:
            proc.kill()
