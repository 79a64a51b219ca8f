"""`spud chat`: a multi-turn chat in the terminal.

Two backends behind one loop:
  * local (`spud chat RUN`): loads the run's latest checkpoint in this process and samples with
    spud.serve.sampling.generate over the tokenizer's chat template; no server involved.
  * remote (`spud chat --url URL`): any OpenAI-compatible server, streamed over SSE with the
    standard library only (urllib), so it needs no extra packages.

Commands: /reset (forget the conversation), /system TEXT (set the system prompt; `/system` alone
shows it, `/system -` clears it), /help, /quit (also /exit, EOF or Ctrl-C at the prompt).
Ctrl-C during a reply stops that reply and returns to the prompt.
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import TextIO

from spud.errors import SpudError

HELP = "commands: /reset  /system TEXT  /system -  /help  /quit"


class ChatError(Exception):
    """A failed reply: printed in the session, which then carries on."""


# ------------------------------------------------------------------------------- backends
class LocalBackend:
    """Generates in-process from a run directory's checkpoint."""

    def __init__(self, run: str, model: str | None = None, checkpoint: str | None = None):
        from spud.runs import choose_model, default_serving_model, load_choice

        # None: the chat model when the run has one (after `spud sft`), else the base model
        choice = choose_model(run, model or default_serving_model(run), checkpoint)
        self.model, self.tok, self.cfg = load_choice(choice)
        self.ckpt, self.kind = choice.checkpoint, choice.model
        self.max_len = self.model.cfg.max_seq_len
        # any special token (end of turn, a new role, bos/eos) ends the reply
        self.stop_ids = sorted(self.tok.special_ids)
        self.name = f"{run} [{choice.describe()}]"
        self.dropped = 0

    def _fit(self, messages: list[dict], max_tokens: int) -> tuple[list[int], int]:
        """Render the chat, dropping the oldest turns (never the system prompt or the newest
        message) until the prompt leaves room to answer. → (ids, number of messages dropped)."""
        room = max(1, min(max_tokens, self.max_len // 4))
        system = [m for m in messages[:1] if m["role"] == "system"]
        turns = messages[len(system):]
        dropped = 0
        while True:
            ids, _ = self.tok.render_chat(system + turns, add_generation_prompt=True)
            if len(ids) + room <= self.max_len or len(turns) <= 1:
                break
            turns = turns[1:]
            dropped += 1
            while len(turns) > 1 and turns[0]["role"] != "user":  # start on a user turn
                turns = turns[1:]
                dropped += 1
        if len(ids) >= self.max_len:
            raise ChatError(
                f"the message is {len(ids)} tokens with the chat template but the model's context is "
                f"{self.max_len}; send something shorter (or /system - to drop the system prompt)"
            )
        return ids, dropped

    def stream(self, messages: list[dict], temperature: float, max_tokens: int) -> Iterator[str]:
        from spud.serve.detok import Detokenizer
        from spud.serve.sampling import generate

        ids, dropped = self._fit(messages, max_tokens)
        self.dropped = dropped
        streamer = Detokenizer(self.tok.decode)
        try:
            for token in generate(self.model, ids, max_tokens, temperature, stop_ids=self.stop_ids):
                piece = streamer.push(token)
                if piece:
                    yield piece
        except SpudError as e:
            raise ChatError(str(e)) from None
        tail = streamer.flush()
        if tail:
            yield tail


class RemoteBackend:
    """Streams from an OpenAI-compatible /v1/chat/completions."""

    def __init__(self, url: str, api_key: str | None, timeout: float = 600.0):
        base = url.strip().rstrip("/")
        if not base.startswith(("http://", "https://")):
            raise SpudError(f"--url must start with http:// or https://, got {url!r}")
        self.base = base if base.endswith("/v1") else base + "/v1"
        self.api_key = api_key
        self.timeout = timeout
        self.dropped = 0
        models = self._json("GET", "/models")
        data = models.get("data") if isinstance(models, dict) else None
        if not data or not isinstance(data[0], dict) or "id" not in data[0]:
            raise SpudError(f"{self.base}/models listed no model; is {url} an OpenAI-compatible server?")
        self.model = str(data[0]["id"])
        self.name = f"{self.model} at {url}"

    def _request(self, method: str, path: str, body: dict | None = None):
        headers = {"Accept": "application/json, text/event-stream"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, headers=headers, method=method)
        try:
            return urllib.request.urlopen(req, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            raise ChatError(_http_error_message(e)) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ChatError(f"cannot reach {self.base}: {reason}") from None

    def _json(self, method: str, path: str) -> dict:
        try:
            with self._request(method, path) as resp:
                return json.loads(resp.read().decode("utf-8"))
        except ChatError as e:
            raise SpudError(str(e)) from None
        except (ValueError, OSError) as e:
            raise SpudError(f"{self.base}{path}: unreadable reply ({e})") from None

    def stream(self, messages: list[dict], temperature: float, max_tokens: int) -> Iterator[str]:
        body = {"model": self.model, "messages": messages, "stream": True,
                "temperature": temperature, "max_tokens": max_tokens}
        resp = self._request("POST", "/chat/completions", body)
        done = finished = False
        try:
            data_lines: list[str] = []
            for raw in resp:
                line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
                if line.startswith("data:"):
                    data_lines.append(line[5:].removeprefix(" "))
                    continue
                if line or not data_lines:
                    continue  # other SSE fields, comments, keep-alive blank lines
                data, data_lines = "\n".join(data_lines), []
                if data.strip() == "[DONE]":
                    done = True
                    break
                try:
                    chunk = json.loads(data)
                except ValueError:
                    raise ChatError(f"the server sent a malformed stream chunk: {data[:120]!r}") from None
                if isinstance(chunk, dict) and chunk.get("error"):
                    err = chunk["error"]
                    raise ChatError(err.get("message", str(err)) if isinstance(err, dict) else str(err))
                choices = chunk.get("choices") if isinstance(chunk, dict) else None
                if not choices:
                    continue
                piece = (choices[0].get("delta") or {}).get("content")
                if piece:
                    yield piece
                if choices[0].get("finish_reason"):
                    finished = True
        except OSError as e:
            raise ChatError(f"the connection broke mid-reply: {e}") from None
        finally:
            resp.close()
        if not done and not finished:
            raise ChatError("the server closed the stream before the reply finished")


def _http_error_message(e: urllib.error.HTTPError) -> str:
    try:
        raw = e.read().decode("utf-8", errors="replace")
    except OSError:
        raw = ""
    detail = raw.strip()[:300]
    try:
        j = json.loads(raw)
        err = j.get("error") if isinstance(j, dict) else None
        if isinstance(err, dict) and err.get("message"):
            detail = str(err["message"])
        elif isinstance(err, str):
            detail = err
        elif isinstance(j, dict) and "detail" in j:
            detail = str(j["detail"])
    except ValueError:
        pass
    return f"HTTP {e.code}: {detail}" if detail else f"HTTP {e.code} {e.reason}"


# ------------------------------------------------------------------------------------ loop
def _read_line(stdin: TextIO, stdout: TextIO, prompt: str) -> str | None:
    """One line of input without its newline; None at EOF."""
    if stdin is sys.stdin and stdout is sys.stdout and stdin.isatty():
        try:
            return input(prompt)  # line editing and history via readline
        except EOFError:
            return None
    stdout.write(prompt)
    stdout.flush()
    line = stdin.readline()
    if line == "":
        return None
    return line.rstrip("\r\n")


def chat(
    run: str | None,
    url: str | None,
    api_key: str | None,
    system: str | None,
    temperature: float,
    max_tokens: int,
    stdin: TextIO = sys.stdin,
    stdout: TextIO = sys.stdout,
    model: str | None = None,
    checkpoint: str | None = None,
) -> int:
    """Run an interactive chat with a local run (`run`) or a server (`url`). Returns the exit code.
    `model` ("base"/"chat", default: chat when the run has one) and `checkpoint` choose what a
    local run loads. Startup problems (no such run, server unreachable, bad arguments) raise SpudError."""
    from spud.serve.sampling import check_sampling_args

    if (run is None) == (url is None):
        raise SpudError("give either a run directory or --url (not both)")
    if url is not None and (model is not None or checkpoint is not None):
        raise SpudError("--model and --checkpoint choose what a local run loads; a server (--url) "
                        "serves the model it was started with")
    check_sampling_args(temperature, None, None, max_tokens)
    backend = LocalBackend(run, model, checkpoint) if run is not None else RemoteBackend(url, api_key)

    out = stdout
    out.write(f"Chatting with {backend.name}. {HELP}\n")
    out.flush()
    history: list[dict] = []
    system_prompt = system or ""

    while True:
        try:
            line = _read_line(stdin, out, "you> ")
        except KeyboardInterrupt:
            out.write("\n")
            break
        if line is None:
            out.write("\n")
            break
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            cmd, _, arg = text.partition(" ")
            arg = arg.strip()
            if cmd in ("/quit", "/exit", "/q"):
                break
            if cmd == "/reset":
                history.clear()
                out.write("(conversation cleared)\n")
            elif cmd == "/system":
                if not arg:
                    out.write(f"(system prompt: {system_prompt!r})\n" if system_prompt else "(no system prompt)\n")
                elif arg == "-":
                    system_prompt = ""
                    out.write("(system prompt cleared)\n")
                else:
                    system_prompt = arg
                    out.write("(system prompt set)\n")
            elif cmd in ("/help", "/?"):
                out.write(HELP + "\n")
            else:
                out.write(f"unknown command {cmd}; {HELP}\n")
            out.flush()
            continue

        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else [])
        messages += history + [{"role": "user", "content": text}]
        out.write("spud> ")
        out.flush()
        pieces: list[str] = []
        try:
            for piece in backend.stream(messages, temperature, max_tokens):
                pieces.append(piece)
                out.write(piece)
                out.flush()
        except ChatError as e:
            out.write(("\n" if pieces else "") + f"error: {e}\n")
            out.flush()
            continue  # the failed turn is not added to the history
        except KeyboardInterrupt:
            out.write(" (stopped)\n")
            out.flush()
            history += [{"role": "user", "content": text}, {"role": "assistant", "content": "".join(pieces)}]
            continue
        out.write("\n")
        if getattr(backend, "dropped", 0):
            out.write(f"(the oldest {backend.dropped} message(s) did not fit the context and were left out)\n")
        out.flush()
        history += [{"role": "user", "content": text}, {"role": "assistant", "content": "".join(pieces)}]
    out.flush()
    return 0
