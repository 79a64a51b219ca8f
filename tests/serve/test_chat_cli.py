"""`spud chat` in the terminal (spud.serve.chat_cli.chat): scripted sessions over StringIO, against
a tiny locally trained run and against a stub OpenAI-compatible server."""

from __future__ import annotations

import io
import json
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from spud.errors import SpudError
from spud.serve.chat_cli import chat

TINY = Path(__file__).parents[2] / "configs" / "tiny.yaml"
# the session's `built_run` data, with a longer context so a short chat fits without trimming
CHAT_OVERRIDES = [
    "data.total_tokens=60000", "tokenizer.vocab_size=400", "tokenizer.train_bytes=200000",
    "train.max_steps=3", "train.eval_every=3", "train.checkpoint_every=3", "train.eval_batches=1",
    "train.micro_batch_size=4", "model.max_seq_len=128",
]


@pytest.fixture(scope="module")
def chat_run(built_run, tmp_path_factory) -> Path:
    from rich.console import Console

    from spud.config import load_config
    from spud.train.trainer import Trainer

    run = tmp_path_factory.mktemp("chat") / "run"
    shutil.copytree(built_run, run)
    Trainer(load_config(TINY, CHAT_OVERRIDES), run, console=Console(quiet=True)).run()
    return run


def session(lines: list[str], **kw) -> tuple[int, str]:
    args = {"run": None, "url": None, "api_key": None, "system": None, "temperature": 0.0, "max_tokens": 6}
    args.update(kw)
    out = io.StringIO()
    rc = chat(**args, stdin=io.StringIO("".join(line + "\n" for line in lines)), stdout=out)
    return rc, out.getvalue()


# -------------------------------------------------------------------------------- local mode
@pytest.fixture
def prompts(monkeypatch):
    """Records the prompt ids each local generation starts from (generation itself is real)."""
    from spud.serve import sampling

    seen = []
    real = sampling.generate

    def spy(model, prompt_ids, *a, **k):
        seen.append(list(prompt_ids))
        return real(model, prompt_ids, *a, **k)

    monkeypatch.setattr(sampling, "generate", spy)
    return seen


def test_local_scripted_session(chat_run, prompts):
    from spud.tokenizer import Tokenizer

    tok = Tokenizer.load(chat_run / "tokenizer.json")
    rc, out = session(
        ["hello", "/system You are terse.", "/system", "what is 2+2", "/reset", "hi", "/bogus", "/quit",
         "never read"],
        run=str(chat_run),
    )
    assert rc == 0, out
    # a run without `spud sft` is chatted with as the base model, and the session says so
    assert out.startswith(f"Chatting with {chat_run} [base model, checkpoint {chat_run / 'checkpoints' / 'step_0000003'}].")
    assert out.count("spud> ") == 3
    for note in ("(system prompt set)", "(system prompt: 'You are terse.')", "(conversation cleared)",
                 "unknown command /bogus"):
        assert note in out
    assert "Traceback" not in out and "never read" not in out
    assert len(prompts) == 3
    texts = [tok.decode(p) for p in prompts]
    assert texts[0] == "<|bos|><|user|>hello<|end|><|assistant|>"
    # turn 2: the system prompt, then the whole first exchange, then the new message
    assert texts[1].startswith("<|bos|><|system|>You are terse.<|end|><|user|>hello<|end|><|assistant|>")
    assert texts[1].endswith("<|end|><|user|>what is 2+2<|end|><|assistant|>")
    # after /reset the history is gone but the system prompt stays
    assert texts[2] == "<|bos|><|system|>You are terse.<|end|><|user|>hi<|end|><|assistant|>"


def test_local_eof_and_system_argument(chat_run, prompts):
    rc, out = session(["hi"], run=str(chat_run), system="Be brief.", temperature=0.7, max_tokens=3)
    assert rc == 0 and out.count("spud> ") == 1 and out.endswith("\n")
    from spud.tokenizer import Tokenizer

    text = Tokenizer.load(chat_run / "tokenizer.json").decode(prompts[0])
    assert text.startswith("<|bos|><|system|>Be brief.<|end|>")


def test_local_context_overflow_is_an_error_line_not_a_traceback(chat_run):
    long = "word " * 400
    rc, out = session([long, "hi", "/quit"], run=str(chat_run))
    assert rc == 0
    assert "error: the message is" in out and "context is 128" in out
    assert "Traceback" not in out
    assert out.count("spud> ") == 2  # the session went on after the error


def test_local_history_is_trimmed_to_fit(chat_run):
    msgs = [f"message number {i} " * 3 for i in range(12)]
    rc, out = session(msgs + ["/quit"], run=str(chat_run), max_tokens=8)
    assert rc == 0 and "did not fit the context" in out and "error" not in out


def test_startup_errors_raise_spud_error(tmp_path):
    with pytest.raises(SpudError):
        session([], run=str(tmp_path / "nope"))
    with pytest.raises(SpudError, match="temperature"):
        session([], run=str(tmp_path), temperature=-1)
    with pytest.raises(SpudError, match="either"):
        session([], run=str(tmp_path), url="http://127.0.0.1:1")
    with pytest.raises(SpudError, match="cannot reach"):
        session([], url=f"http://127.0.0.1:{_free_port()}")


# ------------------------------------------------------------------------------- remote mode
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_stub():
    app = FastAPI()
    app.state.requests = []

    @app.get("/v1/models")
    def models(request: Request):
        if request.headers.get("authorization") == "Bearer wrong":
            return JSONResponse({"error": {"message": "invalid API key", "type": "authentication_error",
                                           "param": None, "code": "invalid_api_key"}}, status_code=401)
        return {"object": "list", "data": [{"id": "stub-model", "object": "model"}]}

    @app.post("/v1/chat/completions")
    async def completions(request: Request):
        body = await request.json()
        app.state.requests.append({"body": body, "authorization": request.headers.get("authorization")})
        last = body["messages"][-1]["content"]
        if last == "please fail":
            return JSONResponse({"error": {"message": "temperature is too spicy", "type": "invalid_request_error",
                                           "param": "temperature", "code": None}}, status_code=400)
        pieces = ["Hello", " from", " the", " stub", "."]

        def chunk(delta, finish=None):
            return "data: " + json.dumps({"object": "chat.completion.chunk", "model": "stub-model",
                                          "choices": [{"index": 0, "delta": delta,
                                                       "finish_reason": finish}]}) + "\n\n"

        async def stream():
            yield ": keep-alive comment\n\n"
            yield chunk({"role": "assistant", "content": ""})
            for i, p in enumerate(pieces):
                if last == "break midway" and i == 2:
                    yield 'data: {"error": {"message": "engine fell over", "type": "server_error"}}\n\n'
                    return
                if last == "hang up" and i == 2:
                    return
                yield chunk({"content": p}, "stop" if i == len(pieces) - 1 else None)
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    return app


@pytest.fixture(scope="module")
def stub():
    import uvicorn

    app = make_stub()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "stub server did not start"
        time.sleep(0.02)
    app.state.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    yield app
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


def test_remote_scripted_session(stub):
    stub.state.requests.clear()
    rc, out = session(
        ["hi", "/system Be nice.", "again", "/reset", "please fail", "break midway", "hang up", "last one"],
        url=stub.state.url, api_key="sk-abc", temperature=0.5, max_tokens=20,
    )  # ends at EOF, no /quit
    assert rc == 0, out
    assert out.startswith(f"Chatting with stub-model at {stub.state.url}.")
    assert out.count("spud> Hello from the stub.\n") == 3
    assert "error: HTTP 400: temperature is too spicy" in out
    assert "spud> Hello from\nerror: engine fell over" in out
    assert "error: the server closed the stream before the reply finished" in out
    assert "Traceback" not in out
    reqs = stub.state.requests
    assert all(r["authorization"] == "Bearer sk-abc" for r in reqs)
    bodies = [r["body"] for r in reqs]
    assert bodies[0] == {"model": "stub-model", "messages": [{"role": "user", "content": "hi"}],
                         "stream": True, "temperature": 0.5, "max_tokens": 20}
    assert bodies[1]["messages"] == [
        {"role": "system", "content": "Be nice."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello from the stub."},
        {"role": "user", "content": "again"},
    ]
    # after /reset: only the system prompt; failed turns never enter the history
    assert bodies[2]["messages"] == [{"role": "system", "content": "Be nice."},
                                     {"role": "user", "content": "please fail"}]
    assert bodies[-1]["messages"] == [{"role": "system", "content": "Be nice."},
                                      {"role": "user", "content": "last one"}]


def test_remote_url_forms_and_auth_error(stub):
    rc, out = session(["/quit"], url=stub.state.url + "/v1/")
    assert rc == 0 and "stub-model" in out
    with pytest.raises(SpudError, match="HTTP 401: invalid API key"):
        session([], url=stub.state.url, api_key="wrong")
    with pytest.raises(SpudError, match="http://"):
        session([], url="127.0.0.1:8000")


def test_ctrl_c_at_prompt_exits_cleanly(stub):
    class InterruptingStdin(io.StringIO):
        def readline(self, *a):
            raise KeyboardInterrupt

    out = io.StringIO()
    rc = chat(None, stub.state.url, None, None, 0.0, 8, stdin=InterruptingStdin(), stdout=out)
    assert rc == 0 and "Traceback" not in out.getvalue()


def test_remote_against_the_real_server(live):
    """--url against the real API server (tests/serve/conftest.py's live server on a tiny run)."""
    rc, out = session(["Hello", "/system Be brief.", "Tell me more", "/quit"], url=live.url, max_tokens=5)
    assert rc == 0, out
    assert out.startswith(f"Chatting with {live.engine.model_name} at {live.url}.")
    assert out.count("spud> ") == 2 and "error:" not in out and "Traceback" not in out
