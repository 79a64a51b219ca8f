"""Running engine requests for the HTTP API: merging several choices' event streams, collecting
a non-streaming answer, and formatting server-sent events.

Split from api.py so the app module holds routing and validation only. Every path that ends a
response early (client gone, server draining, a bug) cancels its engine requests, so no slot
keeps decoding for nobody.
"""

from __future__ import annotations

import asyncio
import json

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from spud.serve import protocol_responses as R
from spud.serve.metrics import ServerMetrics, TokenTimer

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
               503: "service_unavailable_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ERROR_TYPES.get(status, "server_error")
        self.headers = headers

    def body(self) -> dict:
        return R.ErrorResponse(error=R.ErrorDetail(
            message=self.message, type=self.type, param=self.param, code=self.code)).model_dump()

    def response(self, headers: dict | None = None) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=headers or self.headers)


# -------------------------------------------------------------------------------- middleware
# ------------------------------------------------------------------- running engine requests
def _is_finish(ev) -> bool:
    return hasattr(ev, "reason")


def joined_text(events, fin) -> str:
    """Token texts plus what the engine held back (partial stop strings) until the end."""
    return "".join(e.text for e in events) + (fin.text if fin else "")


def _check_finish(fin) -> None:
    if fin.reason == "error":
        raise APIError(500, f"generation failed: {fin.error}", type="server_error")
    if fin.reason == "cancelled":
        raise APIError(503, "request cancelled: the server is shutting down", code="cancelled")
    if fin.reason == "timeout":  # the server's --request-timeout (serve/timeouts.py)
        raise APIError(408, fin.error or "request timed out", type="timeout_error", code="request_timeout")


async def _merge(handles: list, metrics: ServerMetrics, endpoint: str, t0: float):
    """One stream of (choice index, event) from several handles, in arrival order.

    One pump task per handle feeds one queue; the merger awaits the queue directly (no helper
    task per read), so when the consumer stops early (client gone: the generator is closed or
    cancelled mid-await) nothing is left pending, and the finally block cancels the pumps, which
    cancels their engine requests. A pump that dies forwards its exception through the queue.
    """
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(k, h):
        timer = TokenTimer(metrics, endpoint, t0, h)
        try:
            async for ev in h.stream():
                if not _is_finish(ev):
                    timer.token()
                queue.put_nowait((k, ev))
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # noqa: BLE001 - handed to the merger, which raises it
            queue.put_nowait((k, e))

    tasks = [asyncio.create_task(pump(k, h)) for k, h in enumerate(handles)]
    try:
        left = len(handles)
        while left:
            k, ev = await queue.get()
            if isinstance(ev, BaseException):
                raise ev
            left -= _is_finish(ev)
            yield k, ev
    finally:
        for t in tasks:
            t.cancel()


class EventStream(StreamingResponse):
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


async def collect(request: Request, handles: list, metrics: ServerMetrics, endpoint: str, t0: float):
    """Non-streaming: wait for every choice → [(token events, finish event)], cancelling them all if
    the client goes away first (polling, because nothing else tells a plain request handler)."""
    results = [([], None) for _ in handles]

    async def run():
        async for k, ev in _merge(handles, metrics, endpoint, t0):
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


async def stream_events(kind: str, handles, ctx: dict, first: list, offsets: list[int], finished: set, req,
                  prompt_tokens: int, metrics: ServerMetrics, endpoint: str, t0: float, tok, top,
                  tool_names: set[str] | None = None):
    """SSE body. `first[k]` is choice k's opening chunk (chat: the role; completions: the echoed
    prompt, or None). Completions with max_tokens=0 have no handles: the echo is the answer.
    `tool_names`: chat with tools: text is split into content and `delta.tool_calls` (a call
    is sent whole once its closing marker has arrived)."""
    from spud.serve.structured import ToolCallParser

    parsers = [ToolCallParser(tool_names) for _ in first] if tool_names is not None else None
    offsets = list(offsets)  # where choice k's next token starts in its text (legacy logprobs)
    for c in first:
        if c is not None:
            yield _sse(c)
    done_tokens = 0

    def chunk(k: int, text: str, finish: str | None, events=()):
        if kind == "chat":
            lp = R.chat_logprobs(tok, events) if top is not None and events else None
            calls = []
            if parsers is not None:
                before = parsers[k].calls
                text, calls = parsers[k].push(text)
                if finish is not None:
                    text += parsers[k].finish()
                calls = [R.DeltaToolCall(index=before + i, **c) for i, c in enumerate(calls)]
                if finish == "stop" and parsers[k].calls:
                    finish = "tool_calls"
            delta = R.ChatDelta(content=text) if text or finish is None else R.ChatDelta()
            delta.tool_calls = calls or None
            choice = R.ChatChunkChoice(index=k, delta=delta, logprobs=lp, finish_reason=finish)
            return R.ChatCompletionChunk(choices=[choice], **ctx).model_dump(exclude={"usage"})
        lp = None
        if top is not None and events:
            lp = R.legacy_logprobs(tok, [e.token_id for e in events], R.event_logprobs(events), offsets[k])
            offsets[k] += sum(len(s) for s in lp.tokens)
        choice = R.CompletionChoice(index=k, text=text, logprobs=lp, finish_reason=finish)
        return R.CompletionResponse(choices=[choice], **ctx).model_dump(exclude={"usage"})

    # A plain token chunk (no logprobs, no tool parsing, not the last) differs from the one
    # before it only in its text: each choice's chunk is built through the schema once and then
    # only its text is replaced, instead of validating and dumping models for every token (the
    # largest per-token cost of a stream, paid for every stream on the one event loop).
    plain: dict[int, tuple[dict, dict, str]] = {}

    def token_sse(k: int, ev) -> str:
        if top is not None or parsers is not None:
            return _sse(chunk(k, ev.text, None, [ev]))
        if k not in plain:
            d = chunk(k, "", None)
            holder, key = (d["choices"][0]["delta"], "content") if kind == "chat" else (d["choices"][0], "text")
            plain[k] = (d, holder, key)
        d, holder, key = plain[k]
        holder[key] = ev.text
        return _sse(d)

    try:
        if not handles:
            for k in range(len(first)):
                yield _sse(chunk(k, "", "length"))
        async for k, ev in _merge(handles, metrics, endpoint, t0):
            if not _is_finish(ev):
                yield token_sse(k, ev)
                continue
            finished.add(k)
            done_tokens += ev.completion_tokens
            if ev.reason in ("stop", "length"):  # the engine releases held-back text at the end
                yield _sse(chunk(k, ev.text, ev.reason))
            else:  # headers are long gone: report in-band, as OpenAI does for mid-stream errors
                try:
                    _check_finish(ev)
                    err = APIError(503, ev.error or f"request {ev.reason}")
                except APIError as e:  # the same status, type and code as without streaming
                    err = e
                yield _sse(err.body())
        metrics.record_request(endpoint, prompt_tokens, done_tokens, t0)
        if req.stream_options and req.stream_options.include_usage:
            usage = R.Usage(prompt_tokens=prompt_tokens, completion_tokens=done_tokens,
                            total_tokens=prompt_tokens + done_tokens)
            obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
            yield _sse({**ctx, "object": obj, "choices": [], "usage": usage.model_dump()})
        yield "data: [DONE]\n\n"
    except Exception as e:  # noqa: BLE001  a bug mid-stream: report it in-band, do not truncate
        yield _sse(APIError(500, f"internal server error ({type(e).__name__})", type="server_error").body())
        yield "data: [DONE]\n\n"
