"""Fixtures for the HTTP API tests: a tiny trained run, a real Engine, a real uvicorn server.

The server runs in a background thread on 127.0.0.1 and a free port, and tests talk to it over
real sockets with the official `openai` client (and httpx for raw requests), so what is tested is
what clients see: serialization, status codes, SSE framing and disconnects included.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

SERVE_OVERRIDES = [
    "data.total_tokens=40000",
    "tokenizer.vocab_size=400",
    "tokenizer.train_bytes=150000",
    "train.max_steps=3",
    "train.eval_every=3",
    "train.checkpoint_every=3",
    "train.eval_batches=1",
    "train.micro_batch_size=4",
    "train.sample_prompts=[]",
    "model.max_seq_len=64",
]


@pytest.fixture(scope="session")
def serve_run(tmp_path_factory) -> Path:
    """A run directory trained for a few steps: real tokenizer, real checkpoint, seconds to make."""
    from rich.console import Console

    from spud.config import load_config
    from spud.train.trainer import Trainer

    cfg = load_config(Path(__file__).parents[2] / "configs" / "tiny.yaml", SERVE_OVERRIDES)
    run = tmp_path_factory.mktemp("serve") / "tiny-run"
    Trainer(cfg, run, console=Console(quiet=True)).run()
    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn in a thread; `url` is the server root, `engine` and `app` are the live objects."""

    def __init__(self, engine, api_key: str | None = None):
        from spud.serve.server import build_server

        self.engine = engine
        self.port = free_port()
        self.server = build_server(engine, "127.0.0.1", self.port, api_key, log_level="warning")
        self.app = self.server.config.app
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


def make_engine(run: Path, start: bool = True, **limits):
    """start=False: the engine thread never runs, so whatever is submitted stays queued (a
    deterministic stand-in for a saturated server)."""
    from spud.serve.engine import Engine

    engine = Engine.from_run(run, device="cpu", **limits)
    if start:
        engine.start()
    return engine


@pytest.fixture(scope="session")
def live(serve_run):
    srv = LiveServer(make_engine(serve_run, max_batch=16, max_queue=64))
    yield srv
    srv.stop()  # also shuts the engine down (server.py does it on uvicorn shutdown)


@pytest.fixture(scope="session")
def start_server(serve_run):
    """Factory for extra servers with other settings (api key, tiny queue); stopped at the end."""
    started = []

    def start(api_key: str | None = None, start_engine: bool = True, **limits) -> LiveServer:
        started.append(LiveServer(make_engine(serve_run, start_engine, **limits), api_key=api_key))
        return started[-1]

    yield start
    for srv in started:
        srv.stop()


@pytest.fixture(scope="session")
def client(live):
    import openai

    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture
def aclient(live):
    import openai

    return openai.AsyncOpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="session")
def model_name(live) -> str:
    return live.engine.model_name


@pytest.fixture
def http(live):
    import httpx

    with httpx.Client(base_url=live.url, timeout=30) as c:
        yield c
