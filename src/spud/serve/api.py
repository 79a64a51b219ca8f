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
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from spud.errors import SpudError
from spud.serve import protocol as P
from spud.serve.engine import ContextLengthError, QueueFullError, SamplingParams
from spud.serve.metrics import CONTENT_TYPE, ServerMetrics
from spud.serve.streaming import (
    APIError,
    EventStream,
    collect,
    joined_text,
    stream_events,
)

WEB_DIR = Path(__file__).parent / "web"

PROTECTED_PREFIXES = ("/v1/", "/tokenize", "/detokenize")
KNOWN_ENDPOINTS = {"/v1/models", "/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize",
                   "/health", "/metrics"}
ERROR_DOCS = {c: {"model": P.ErrorResponse} for c in (400, 401, 404, 413, 429, 500, 503)}


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


# ------------------------------------------------------------------------------- the app
def create_app(engine, api_key: str | None = None, max_body_bytes: int = 1_000_000) -> FastAPI:
    """The engine must already be started (serve() or the caller does that); the app only uses
    submit / prompt_logprobs / stats and never owns the engine's lifetime."""
    app = FastAPI(title="Spud OpenAI-compatible API", version="1")
    metrics = ServerMetrics()
    app.state.engine, app.state.metrics, app.state.draining = engine, metrics, False
    app.add_middleware(_Guard, api_key=api_key, max_body=max_body_bytes, metrics=metrics)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(APIError, lambda _r, e: e.response())
    app.add_exception_handler(Exception, _server_error)
    tok, started = engine.tokenizer, int(time.time())
    vocab = getattr(engine, "vocab_size", tok.vocab_size)  # the model's (maybe padded) vocabulary

    def card() -> P.ModelCard:
        return P.ModelCard(id=engine.model_name, created=started, max_model_len=engine.max_context,
                           spud_model=getattr(engine, "model_kind", None),
                           checkpoint=getattr(engine, "checkpoint", None))

    def check_ready(model: str | None) -> None:
        if model is not None and model != engine.model_name:
            raise APIError(404, f"model {model!r} does not exist; this server serves {engine.model_name!r}",
                           param="model", code="model_not_found")
        if app.state.draining:
            raise APIError(503, "server is shutting down", code="shutting_down")

    def check_ids(ids: list[int], param: str) -> None:
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise APIError(400, f"{param}: token id {bad[0]} is outside the vocabulary [0, {vocab})",
                           param=param)

    def room(ids: list[int], param: str, need: int = 1) -> int:
        """Tokens left after the prompt; 400 (stating both numbers) when not even `need` fit."""
        left = engine.max_context - len(ids)
        if left < need:
            raise APIError(400, f"the prompt is {len(ids)} tokens but the model's context is {engine.max_context}"
                           "; shorten it", param=param, code="context_length_exceeded")
        return left

    def sampling(req, max_tokens: int, top: int | None, stop_ids: list[int]) -> list[SamplingParams]:
        bias = {int(k): float(v) for k, v in (req.logit_bias or {}).items()}
        check_ids(list(bias), "logit_bias")
        return [SamplingParams(
            max_tokens=max_tokens, temperature=float(req.temperature), top_p=float(req.top_p),
            top_k=max(req.top_k, 0), min_p=float(req.min_p), presence_penalty=float(req.presence_penalty),
            frequency_penalty=float(req.frequency_penalty), logit_bias=bias or None,
            # each choice gets its own seed, or n seeded choices would all be identical
            seed=None if req.seed is None else req.seed + i, stop=req.stop_list(),
            stop_token_ids=list(stop_ids), logprobs=top,
        ) for i in range(req.n)]

    def submit_all(jobs: list[tuple[list[int], SamplingParams]], param: str) -> list:
        handles = []
        try:
            for ids, params in jobs:
                handles.append(engine.submit(ids, params))
        except BaseException as e:
            for h in handles:  # all or nothing: never leave some of the choices running
                h.cancel()
            if isinstance(e, QueueFullError):
                raise APIError(429, f"server is busy, retry later ({e})", code="queue_full") from None
            if isinstance(e, ContextLengthError):
                raise APIError(400, str(e), param=param, code="context_length_exceeded") from None
            if isinstance(e, SpudError):
                raise APIError(503 if app.state.draining else 400, str(e), param=param) from None
            raise
        return handles

    def render_messages(messages: list[P.ChatMessage], generation_prompt: bool) -> list[int]:
        plain = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
        try:
            return tok.render_chat(plain, add_generation_prompt=generation_prompt)[0]
        except SpudError as e:
            raise APIError(400, str(e), param="messages") from None

    def prompt_list(prompt) -> list[tuple[list[int], int, str]]:
        """→ [(ids for the engine, how many BOS we prepended, the prompt's text)] per prompt."""
        if isinstance(prompt, str) or isinstance(prompt[0], int):
            prompt = [prompt]
        out = []
        for p in prompt:
            if isinstance(p, str):
                ids, text = tok.encode(p), p
            else:
                check_ids(p, "prompt")
                ids, text = list(p), tok.decode(p)
            # base models saw BOS open every training document; without it they are off-distribution
            added = 0 if ids and ids[0] == tok.bos_id else 1
            out.append(([tok.bos_id] * added + ids, added, text))
        return out

    # The chat page loads static/* and v1/* by relative path, so it must live at the root.
    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(WEB_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")

    @app.get("/health")
    async def health():
        if app.state.draining:
            return JSONResponse({"status": "shutting_down"}, status_code=503)
        return {"status": "ok", "model": engine.model_name}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics_text():
        return PlainTextResponse(metrics.render(engine.stats()), media_type=CONTENT_TYPE)

    @app.get("/v1/models", response_model=P.ModelList, responses=ERROR_DOCS)
    async def list_models():
        return P.ModelList(data=[card()])

    @app.get("/v1/models/{model_id}", response_model=P.ModelCard, responses=ERROR_DOCS)
    async def get_model(model_id: str):
        if model_id != engine.model_name:
            check_ready(model_id)
        return card()

    @app.post("/tokenize", response_model=P.TokenizeResponse, responses=ERROR_DOCS)
    async def tokenize(req: P.TokenizeRequest):
        if req.prompt is not None:
            ids = tok.encode(req.prompt, add_bos=req.add_special_tokens)
        else:
            ids = render_messages(req.messages, req.add_special_tokens)
        return P.TokenizeResponse(tokens=ids, count=len(ids), max_model_len=engine.max_context)

    @app.post("/detokenize", response_model=P.DetokenizeResponse, responses=ERROR_DOCS)
    async def detokenize(req: P.DetokenizeRequest):
        check_ids(req.tokens, "tokens")
        return P.DetokenizeResponse(prompt=tok.decode(req.tokens))

    @app.post("/v1/completions", response_model=P.CompletionResponse, responses=ERROR_DOCS)
    async def completions(req: P.CompletionRequest, request: Request):
        t0, endpoint = time.perf_counter(), "/v1/completions"
        check_ready(req.model)
        if req.max_tokens == 0 and not req.echo:
            raise APIError(400, "max_tokens=0 is only allowed with echo=true (prompt scoring)", param="max_tokens")
        prompts, generate = prompt_list(req.prompt), req.max_tokens != 0
        jobs = []
        for ids, _, _ in prompts:
            left = room(ids, "prompt", need=1 if generate else 0)
            if generate:
                jobs += [(ids, p) for p in sampling(req, req.max_tokens or left, req.logprobs, [])]
        # choice k = prompt k // n, sample k % n (OpenAI's order); echo is per prompt
        owner = [k // req.n for k in range(len(prompts) * req.n)]
        echo = [("", [], []) for _ in prompts]
        if req.echo:
            for pi, (ids, added, text) in enumerate(prompts):
                lps = []
                if req.logprobs is not None:
                    lps = (await asyncio.to_thread(engine.prompt_logprobs, ids, req.logprobs))[added:]
                echo[pi] = (text, ids[added:], lps)
        base = [len(prompts[pi][2]) for pi in owner]  # OpenAI offsets count from the prompt's start
        handles = submit_all(jobs, "prompt") if jobs else []
        ctx = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": engine.model_name}
        prompt_tokens = sum(len(ids) for ids, _, _ in prompts)

        def echo_lp(pi: int):
            _, ids, lps = echo[pi]
            if req.logprobs is None or not req.echo:
                return None
            return P.legacy_logprobs(tok, ids, lps, 0)

        if req.stream:
            first = [P.CompletionResponse(choices=[P.CompletionChoice(
                index=k, text=echo[pi][0], logprobs=echo_lp(pi))], **ctx) if req.echo else None
                for k, pi in enumerate(owner)]
            finished: set = set()
            body = stream_events("completion", handles, ctx, first, base, finished, req, prompt_tokens, metrics,
                           endpoint, t0, tok, req.logprobs)
            return EventStream(body, handles, finished)
        results = await collect(request, handles, metrics, endpoint, t0) if handles else [([], None)] * len(owner)
        choices, done = [], 0
        for k, pi in enumerate(owner):
            events, fin = results[k]
            done += fin.completion_tokens if fin else 0
            lp = echo_lp(pi)
            if req.logprobs is not None and events:
                gen = P.legacy_logprobs(tok, [e.token_id for e in events], P.event_logprobs(events), base[k])
                lp = gen if lp is None else P.CompletionLogprobs(
                    **{f: getattr(lp, f) + getattr(gen, f) for f in P.CompletionLogprobs.model_fields})
            elif req.logprobs is not None and lp is None:
                lp = P.CompletionLogprobs()
            choices.append(P.CompletionChoice(index=k, text=echo[pi][0] + joined_text(events, fin),
                                              logprobs=lp, finish_reason=fin.reason if fin else "length"))
        metrics.record_request(endpoint, prompt_tokens, done, t0)
        usage = P.Usage(prompt_tokens=prompt_tokens, completion_tokens=done, total_tokens=prompt_tokens + done)
        return P.CompletionResponse(choices=choices, usage=usage, **ctx)

    @app.post("/v1/chat/completions", response_model=P.ChatCompletionResponse, responses=ERROR_DOCS)
    async def chat_completions(req: P.ChatCompletionRequest, request: Request):
        t0, endpoint = time.perf_counter(), "/v1/chat/completions"
        check_ready(req.model)
        if req.top_logprobs and not req.logprobs:
            raise APIError(400, "top_logprobs requires logprobs=true", param="top_logprobs")
        ids = render_messages(req.messages, True)
        left = room(ids, "messages")
        top = (req.top_logprobs or 0) if req.logprobs else None
        # the chat template closes every turn with <|end|>: that is where the assistant stops
        params = sampling(req, req.max_completion_tokens or req.max_tokens or left, top, [tok.end_id])
        handles = submit_all([(ids, p) for p in params], "messages")
        ctx = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": engine.model_name}
        if req.stream:
            first = [P.ChatCompletionChunk(choices=[P.ChatChunkChoice(
                index=k, delta=P.ChatDelta(role="assistant", content=""))], **ctx).model_dump(exclude={"usage"})
                for k in range(req.n)]
            finished: set = set()
            body = stream_events("chat", handles, ctx, first, [0] * req.n, finished, req, len(ids), metrics,
                           endpoint, t0, tok, top)
            return EventStream(body, handles, finished)
        results = await collect(request, handles, metrics, endpoint, t0)
        choices = [P.ChatChoice(index=k, message=P.ChatResponseMessage(content=joined_text(events, fin)), finish_reason=fin.reason,
                                logprobs=P.chat_logprobs(tok, events) if top is not None else None)
                   for k, (events, fin) in enumerate(results)]
        done = sum(fin.completion_tokens for _, fin in results)
        metrics.record_request(endpoint, len(ids), done, t0)
        usage = P.Usage(prompt_tokens=len(ids), completion_tokens=done, total_tokens=len(ids) + done)
        return P.ChatCompletionResponse(choices=choices, usage=usage, **ctx)

    return app
