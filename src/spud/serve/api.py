"""The OpenAI-compatible HTTP API: `create_app(engine)` → a FastAPI app.

The app never runs the model itself: it validates a request (schemas in protocol.py), turns it
into token ids + SamplingParams, submits one engine request per choice and formats the engine's
events as OpenAI JSON or server-sent events. Transport concerns that must happen before FastAPI
parses anything (API key, body size, per-status request counts) live in a raw ASGI middleware,
so an oversized or unauthenticated body is rejected without being buffered or parsed.

Error policy: anything the client can get wrong is a 4xx in OpenAI's error shape; a 500 means a
bug here or in the engine, never bad input.
"""

from __future__ import annotations

import asyncio
import hmac
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from spud.errors import SpudError
from spud.serve import protocol as P
from spud.serve.engine import ContextLengthError, QueueFullError, SamplingParams
from spud.serve.metrics import CONTENT_TYPE, ServerMetrics

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
               503: "service_unavailable_error"}
PROTECTED_PREFIXES = ("/v1/", "/tokenize", "/detokenize")
KNOWN_ENDPOINTS = {"/v1/models", "/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize",
                   "/health", "/metrics"}
ERROR_DOCS = {c: {"model": P.ErrorResponse} for c in (400, 401, 404, 413, 429, 500, 503)}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ERROR_TYPES.get(status, "server_error")

    def body(self) -> dict:
        return P.ErrorResponse(error=P.ErrorDetail(
            message=self.message, type=self.type, param=self.param, code=self.code)).model_dump()

    def response(self, headers: dict | None = None) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


# -------------------------------------------------------------------------------- middleware
class _Guard:
    """API key, body-size limit and request counting, in front of routing and parsing."""

    def __init__(self, app, *, api_key: str | None, max_body: int, metrics: ServerMetrics):
        self.app, self.api_key, self.max_body, self.metrics = app, api_key, max_body, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]  # stays 500 if the app dies before starting a response

        async def send_tracking(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)

        try:
            err = self._auth_error(scope)
            if err is None and scope["method"] in ("POST", "PUT", "PATCH"):
                receive, err = await self._buffer_body(scope, receive)
            if err is not None:
                await err.response()(scope, receive, send_tracking)
            elif receive is not None:
                await self.app(scope, receive, send_tracking)
        finally:
            path = scope["path"]
            self.metrics.requests.inc(path if path in KNOWN_ENDPOINTS else "other", str(status[0]))

    def _auth_error(self, scope) -> APIError | None:
        if not self.api_key or not scope["path"].startswith(PROTECTED_PREFIXES):
            return None
        headers = dict(scope["headers"])
        auth = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, key = auth.partition(" ")
        # compare_digest: the time taken must not reveal how many leading characters matched
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
            return APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                            code="invalid_api_key")
        return None

    async def _buffer_body(self, scope, receive):
        """Read the whole body (bounded) and hand the app a receive() that replays it. Checking the
        header alone is not enough: chunked uploads have no Content-Length, and clients can lie."""
        too_big = APIError(413, f"request body exceeds {self.max_body} bytes", code="request_too_large")
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                return receive, APIError(400, "invalid Content-Length header")
            if int(declared) > self.max_body:
                return receive, too_big
        body = bytearray()
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return None, None  # client gone before sending its body: nothing to answer
            body += msg.get("body", b"")
            if len(body) > self.max_body:
                return receive, too_big
            if not msg.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # afterwards: disconnect detection still works

        return replay, None


# ---------------------------------------------------------------------------- error mapping
def _param_path(loc) -> str | None:
    """('body', 'messages', 0, 'role') → 'messages[0].role'. Pydantic puts union-member tags such
    as 'list[int]' or 'constrained-int' into the path; they are not fields, so stop there."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not part.isidentifier() or part in {"str", "int", "float", "bool", "list", "dict"}:
            break
        else:
            out += f".{part}" if out else part
    return out or None


def _validation_error(_req, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    if first.get("type") == "json_invalid":
        return APIError(400, "request body is not valid JSON", code="invalid_json").response()
    param = _param_path(tuple(first.get("loc", ())))
    msg = first.get("msg", "invalid value")
    return APIError(400, f"{param}: {msg}" if param else msg, param=param).response()


def _http_error(_req, exc: StarletteHTTPException) -> JSONResponse:
    msg = {404: "no such route", 405: "method not allowed"}.get(exc.status_code, str(exc.detail))
    return APIError(exc.status_code, msg).response(headers=getattr(exc, "headers", None))


def _server_error(_req, exc: Exception) -> JSONResponse:
    return APIError(500, f"internal server error ({type(exc).__name__})", type="server_error").response()


# ------------------------------------------------------------------- running engine requests
def _is_finish(ev) -> bool:
    return hasattr(ev, "reason")


def _check_finish(fin) -> None:
    if fin.reason == "error":
        raise APIError(500, f"generation failed: {fin.error}", type="server_error")
    if fin.reason == "cancelled":
        raise APIError(503, "request cancelled: the server is shutting down", code="cancelled")


async def _merge(handles: list, ttft, endpoint: str, t0: float):
    """One stream of (choice index, event) from several handles, in arrival order."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(k, h):
        first = True
        async for ev in h.stream():
            if first and not _is_finish(ev):
                ttft.observe(time.perf_counter() - t0, endpoint)
                first = False
            await queue.put((k, ev))

    tasks = [asyncio.create_task(pump(k, h)) for k, h in enumerate(handles)]
    try:
        left = len(handles)
        while left:
            get = asyncio.create_task(queue.get())
            done, _ = await asyncio.wait([get, *[t for t in tasks if not t.done()]],
                                         return_when=asyncio.FIRST_COMPLETED)
            if get not in done:
                get.cancel()
                for t in done:  # a pump died: surface its exception instead of hanging
                    if t.exception() is not None:
                        raise t.exception()
                continue
            k, ev = get.result()
            left -= _is_finish(ev)
            yield k, ev
    finally:
        for t in tasks:
            t.cancel()


class _EventStream(StreamingResponse):
    """SSE response that cancels its engine requests however it ends. Starlette cancels the
    response when the client disconnects; without this, the slots would decode for nobody."""

    def __init__(self, body, handles: list, finished: set):
        super().__init__(body, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.handles, self.finished = handles, finished

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            for k, h in enumerate(self.handles):
                if k not in self.finished:
                    h.cancel()


async def _collect(request: Request, handles: list, metrics: ServerMetrics, endpoint: str, t0: float):
    """Non-streaming: wait for every choice → [(token events, finish event)], cancelling them all if
    the client goes away first (polling, because nothing else tells a plain request handler)."""
    results = [([], None) for _ in handles]

    async def run():
        async for k, ev in _merge(handles, metrics.ttft, endpoint, t0):
            if _is_finish(ev):
                results[k] = (results[k][0], ev)
            else:
                results[k][0].append(ev)

    task = asyncio.create_task(run())
    try:
        while not task.done():
            await asyncio.wait([task], timeout=0.5)
            if not task.done() and await request.is_disconnected():
                task.cancel()
                raise APIError(499, "client disconnected")
        task.result()
    except BaseException:
        task.cancel()
        for h in handles:
            h.cancel()
        raise
    for _, fin in results:
        _check_finish(fin)
    return results


def _sse(obj) -> str:
    data = obj.model_dump_json(exclude_none=False) if hasattr(obj, "model_dump_json") else json.dumps(obj)
    return f"data: {data}\n\n"


async def _stream(kind: str, handles, ctx: dict, first: list, finished: set, req, prompt_tokens: int,
                  metrics: ServerMetrics, endpoint: str, t0: float, tok, top):
    """SSE body. `first[k]` is choice k's opening chunk (chat: the role; completions: the echoed
    prompt, or None). Completions with max_tokens=0 have no handles: the echo is the answer."""
    offsets = [len(c.choices[0].text) if kind == "completion" and c else 0 for c in first]
    offsets = [o + len(getattr(req, "_prompt_texts", [""] * len(first))[k]) for k, o in enumerate(offsets)]
    for c in first:
        if c is not None:
            yield _sse(c)
    done_tokens = 0

    def chunk(k: int, text: str, finish: str | None, events=()):
        if kind == "chat":
            lp = P.chat_logprobs(tok, events) if top is not None and events else None
            delta = P.ChatDelta(content=text) if text or finish is None else P.ChatDelta()
            choice = P.ChatChunkChoice(index=k, delta=delta, logprobs=lp, finish_reason=finish)
            return P.ChatCompletionChunk(choices=[choice], **ctx).model_dump(exclude={"usage"})
        lp = None
        if top is not None and events:
            lp = P.legacy_logprobs(tok, [e.token_id for e in events], P.event_logprobs(events), offsets[k])
            offsets[k] += sum(len(s) for s in lp.tokens)
        choice = P.CompletionChoice(index=k, text=text, logprobs=lp, finish_reason=finish)
        return P.CompletionResponse(choices=[choice], **ctx).model_dump(exclude={"usage"})

    try:
        if not handles:
            for k in range(len(first)):
                yield _sse(chunk(k, "", "length"))
        async for k, ev in _merge(handles, metrics.ttft, endpoint, t0):
            if not _is_finish(ev):
                yield _sse(chunk(k, ev.text, None, [ev]))
                continue
            finished.add(k)
            done_tokens += ev.completion_tokens
            if ev.reason in ("stop", "length"):
                yield _sse(chunk(k, "", ev.reason))
            else:  # headers are long gone: report in-band, as OpenAI does for mid-stream errors
                err = APIError(500 if ev.reason == "error" else 503, ev.error or f"request {ev.reason}")
                yield _sse(err.body())
        metrics.record_request(endpoint, prompt_tokens, done_tokens, t0)
        if req.stream_options and req.stream_options.include_usage:
            usage = P.Usage(prompt_tokens=prompt_tokens, completion_tokens=done_tokens,
                            total_tokens=prompt_tokens + done_tokens)
            obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
            yield _sse({**ctx, "object": obj, "choices": [], "usage": usage.model_dump()})
        yield "data: [DONE]\n\n"
    except Exception as e:  # a bug mid-stream: tell the client in-band rather than truncating
        yield _sse(APIError(500, f"internal server error ({type(e).__name__})", type="server_error").body())
        yield "data: [DONE]\n\n"
