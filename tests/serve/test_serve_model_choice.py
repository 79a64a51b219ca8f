"""Which model `spud serve` and `spud chat` load: `--model base|chat`, the default (chat when the
run has been through `spud sft`, else base), what they print, and what /v1/models says. The
served numbers are checked against each model's own forward pass, so a server that loaded the
other model fails."""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from spud.cli import main
from spud.errors import SpudError

SFT_OVERRIDES = ["sft.max_steps=2", "sft.checkpoint_every=2", "sft.eval_every=2", "sft.eval_batches=1",
                 "sft.micro_batch_size=4", "sft.builtin_conversations=120", "train.sample_tokens=4",
                 "train.threads=1", "sft.max_bad_fraction=0.5"]  # long built-in chats do not fit 64 tokens
PROMPT = "def add(a, b):\n    return"


@pytest.fixture(scope="module")
def sft_run(serve_run, tmp_path_factory) -> Path:
    """A copy of the serving test run, fine-tuned into RUN/chat by a real (tiny) `spud sft`."""
    from rich.console import Console

    from spud.posttrain.sft import sft_cmd

    run = tmp_path_factory.mktemp("sftserve") / "tiny-run"
    shutil.copytree(serve_run, run)
    sft_cmd(str(run), ["builtin"], None, SFT_OVERRIDES, resume=False, console=Console(quiet=True))
    return run


@torch.no_grad()
def prompt_logprobs_by_hand(run: Path, model: str, text: str) -> list[float]:
    """log p(token | BOS + the tokens before it) for every token of `text`, from one forward pass
    of RUN's `model`, loaded here independently of the server."""
    from spud.runs import load_model

    net, tok, _, _ = load_model(run, None, "cpu", model=model)
    ids = tok.encode(text)
    logp = torch.log_softmax(net(torch.tensor([[tok.bos_id, *ids]]))[0].float(), dim=-1)
    return [float(logp[j, t]) for j, t in enumerate(ids)]


def served_prompt_logprobs(http, name: str) -> list[float | None]:
    r = http.post("/v1/completions", json={"model": name, "prompt": PROMPT, "max_tokens": 0,
                                           "echo": True, "logprobs": 1})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["logprobs"]["token_logprobs"]


def test_serve_cli_model_base_prints_and_serves_the_base_model(sft_run):
    """`spud serve RUN --model base` in its own process, although RUN has a chat model."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "spud.cli", "serve", str(sft_run), "--model", "base",
                             "--port", str(port), "--device", "cpu", "--max-batch", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "server did not start"
            time.sleep(0.1)
        with httpx.Client(base_url=url, timeout=60) as http:
            (card,) = http.get("/v1/models").json()["data"]
            assert card["id"] == "tiny-run-base" and card["spud_model"] == "base"
            assert card["checkpoint"] == str(sft_run / "checkpoints" / "step_0000003")
            got = served_prompt_logprobs(http, card["id"])
            # documented choice: a base model still answers chat completions (it is how a
            # pretrained-only run is first tried), and the banner says what that means
            r = http.post("/v1/chat/completions", json={"model": card["id"], "max_tokens": 3,
                                                        "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 200, r.text
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    base = prompt_logprobs_by_hand(sft_run, "base", PROMPT)
    chat = prompt_logprobs_by_hand(sft_run, "chat", PROMPT)
    assert got[1:] == pytest.approx(base[1:], abs=1e-4)  # the first has no context but BOS
    assert max(abs(a - b) for a, b in zip(got[1:], chat[1:])) > 1e-3
    assert "Serving model 'tiny-run-base'" in out
    assert f"model: base model, checkpoint {sft_run / 'checkpoints' / 'step_0000003'}" in out
    assert "a base (pretrained) model, not fine-tuned for chat" in out


def test_default_serves_the_chat_model_and_says_so(sft_run):
    import httpx

    from spud.serve.engine import Engine
    from spud.serve.server import _banner, build_server

    engine = Engine.from_run(sft_run, device="cpu", max_batch=2)
    engine.start()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = build_server(engine, "127.0.0.1", port, log_level="warning")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
            time.sleep(0.02)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            (card,) = http.get("/v1/models").json()["data"]
            got = served_prompt_logprobs(http, card["id"])
    finally:
        server.should_exit = True  # its shutdown also stops the engine
        thread.join(timeout=15)
    chat_ckpt = sft_run / "chat" / "checkpoints" / "step_0000002"
    assert card["id"] == "tiny-run-chat" and card["spud_model"] == "chat"
    assert card["checkpoint"] == str(chat_ckpt)
    assert got[1:] == pytest.approx(prompt_logprobs_by_hand(sft_run, "chat", PROMPT)[1:], abs=1e-4)
    banner = _banner(engine, "127.0.0.1", 8000, None)
    assert f"model: chat model, checkpoint {chat_ckpt}" in banner and "not fine-tuned" not in banner


def test_serve_model_chat_without_sft_is_a_clear_error(serve_run, capsys):
    assert main(["serve", str(serve_run), "--model", "chat", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"{serve_run} has no chat model" in err and f"spud sft {serve_run}" in err


def test_chat_cli_model_flag(sft_run):
    from spud.serve.chat_cli import chat

    def banner(run=sft_run, **kw) -> str:
        out = io.StringIO()
        assert chat(str(run), None, None, None, 0.0, 4, stdin=io.StringIO("/quit\n"), stdout=out, **kw) == 0
        return out.getvalue().splitlines()[0]

    base_ckpt = sft_run / "checkpoints" / "step_0000003"
    chat_ckpt = sft_run / "chat" / "checkpoints" / "step_0000002"
    assert banner().startswith(f"Chatting with {sft_run} [chat model, checkpoint {chat_ckpt}].")
    assert banner(model="base").startswith(f"Chatting with {sft_run} [base model, checkpoint {base_ckpt}].")
    assert banner(model="chat", checkpoint="2").startswith(f"Chatting with {sft_run} [chat model, checkpoint {chat_ckpt}]")
    # the chat run directory given directly is a chat model too (e.g. `spud sft --out DIR`)
    assert banner(sft_run / "chat").startswith(f"Chatting with {sft_run / 'chat'} [chat model, checkpoint {chat_ckpt}]")
    with pytest.raises(SpudError, match="holds a chat model, not the base model asked for; choose it with --model chat"):
        banner(sft_run / "chat", model="base")
    with pytest.raises(SpudError, match="chat: no checkpoint"):  # step 3 is the base model's, not chat's
        banner(model="chat", checkpoint="3")
    with pytest.raises(SpudError, match="a server .--url. serves the model it was started with"):
        chat(None, "http://127.0.0.1:9", None, None, 0.0, 4, model="base")
