"""The OpenAI-compatible HTTP API: `create_app(engine)` → a FastAPI app.

The app never runs the model itself: it validates a request (schemas in protocol.py), turns it
into token ids + SamplingParams, submits one engine request per choice and formats the engine's
events as OpenAI JSON or server-sent events (streaming.py). What sits around the routes (API
key, body limit, request counting, error shapes, the OpenAPI document) is in boundary.py.

Error policy: anything the client can get wrong is a 4xx in OpenAI's error shape; a 500 means a
bug here or in the engine, never bad input, and even then the connection stays usable.

Tokenizing and detokenizing run in a worker thread: a 1 MB prompt takes long enough to stall
every other stream (and /health) if done on the event loop. Text from clients is always encoded
as plain text (tokenizer.py): only the chat template adds control tokens.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from spud.serve import images
from spud.serve import protocol as P
from spud.serve import protocol_responses as R
from spud.serve.api_requests import RequestPrep
from spud.serve.boundary import Guard, http_error, openapi_document, server_error, validation_error
from spud.serve.metrics import ServerMetrics
from spud.serve.structured import GrammarCompiler, ToolCallParser
from spud.serve.streaming import (
    APIError,
    EventStream,
    collect,
    joined_text,
    stream_events,
)

WEB_DIR = Path(__file__).parent / "web"


def _errors(*codes: int) -> dict:
    """OpenAPI `responses` for the error statuses a route really returns (all OpenAI-shaped).
    401 only happens when the server has an API key, 500 only on a bug; both can happen anywhere."""
    return {c: {"model": R.ErrorResponse} for c in sorted({*codes, 401, 500})}




def _sse(chunk: str) -> dict:
    """stream=true answers with server-sent events, one per chunk: `data: <chunk JSON>`, then
    `data: [DONE]`. In OpenAPI 3.1 an event stream's schema describes one event."""
    json_data = {"type": "string", "contentMediaType": "application/json", "contentSchema": {"anyOf": [
        {"$ref": f"#/components/schemas/{chunk}"}, {"$ref": "#/components/schemas/ErrorResponse"}]}}
    data = {"anyOf": [json_data, {"const": "[DONE]"}],
            "description": f"a {chunk} as JSON (an ErrorResponse if generation fails mid-stream), "
                           "then the literal [DONE]"}
    return {200: {"content": {"text/event-stream": {"schema": {
        "type": "object", "required": ["data"], "properties": {"data": data}}}}}}


GENERATION_ERRORS = _errors(400, 404, 408, 413, 429, 503)  # 408: --request-timeout


# ------------------------------------------------------------------------------- the app
def create_app(engine, api_key: str | None = None, max_body_bytes: int | None = None) -> FastAPI:
    """The engine must already be started (serve() or the caller does that); the app only uses
    submit / prompt_logprobs / stats and never owns the engine's lifetime. The body limit is
    1 MB, or images.VISION_BODY_BYTES when the model takes images."""
    if max_body_bytes is None:
        max_body_bytes = images.VISION_BODY_BYTES if images.vision_of(engine) else 1_000_000
    app = FastAPI(title="Spud OpenAI-compatible API", version="1")
    metrics = ServerMetrics(engine)
    app.state.engine, app.state.metrics, app.state.draining = engine, metrics, False
    app.add_middleware(Guard, api_key=api_key, max_body=max_body_bytes, metrics=metrics)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(APIError, lambda _r, e: e.response())
    app.add_exception_handler(Exception, server_error)
    tok, started = engine.tokenizer, int(time.time())
    vocab = getattr(engine, "vocab_size", tok.vocab_size)  # the model's (maybe padded) vocabulary
    app.openapi = lambda: images.openapi_images(
        openapi_document(app, engine.model_name, vocab, engine.max_context), engine)
    ends = getattr(engine, "end_ids", None) or {tok.end_id, tok.eos_id}
    grammars = GrammarCompiler(tok, vocab, sorted(ends))
    prep = RequestPrep(app, engine, tok, vocab, grammars)  # request checks and conversions (api_requests.py)

    def card() -> R.ModelCard:
        return R.ModelCard(id=engine.model_name, created=started, max_model_len=engine.max_context,
                           spud_model=getattr(engine, "model_kind", None),
                           checkpoint=getattr(engine, "checkpoint", None))

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

    @app.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    async def metrics_text(request: Request):
        body, content_type = metrics.render(request.headers.get("accept"))
        return Response(body, media_type=content_type)

    @app.get("/v1/models", response_model=R.ModelList, responses=_errors())
    async def list_models():
        return R.ModelList(data=[card()])

    @app.get("/v1/models/{model_id}", response_model=R.ModelCard, responses=_errors(404))
    async def get_model(model_id: str):
        if model_id != engine.model_name:
            prep.check_ready(model_id)
        return card()

    @app.post("/tokenize", response_model=R.TokenizeResponse, responses=_errors(400, 404, 413))
    async def tokenize(req: P.TokenizeRequest):
        """Exactly the ids the generation endpoints would use: text is always plain text."""
        prep.check_model(req.model)
        if req.prompt is not None:
            ids = await prep.off_loop("prompt", tok.encode, req.prompt, req.add_special_tokens)
        else:
            ids, _ = await prep.render_messages(req.messages, req.add_special_tokens)
        # a 1 MB prompt is ~10^5-10^6 ids: serialise them off the loop too
        body = await asyncio.to_thread(lambda: R.TokenizeResponse(
            tokens=ids, count=len(ids), max_model_len=engine.max_context).model_dump_json())
        return Response(body, media_type="application/json")

    @app.post("/detokenize", response_model=R.DetokenizeResponse, responses=_errors(400, 404, 413))
    async def detokenize(req: P.DetokenizeRequest):
        prep.check_model(req.model)
        prep.check_ids(req.tokens, "tokens")
        return R.DetokenizeResponse(prompt=await prep.off_loop("tokens", tok.decode, req.tokens))

    @app.post("/v1/completions", response_model=R.CompletionResponse,
              responses={**GENERATION_ERRORS, **_sse("CompletionResponse")})
    async def completions(req: P.CompletionRequest, request: Request):
        t0, endpoint = time.perf_counter(), "/v1/completions"
        prep.check_ready(req.model)
        if req.max_tokens == 0 and not req.echo:
            raise APIError(400, "max_tokens=0 is only allowed with echo=true (prompt scoring)", param="max_tokens")
        prep.check_new_tokens(req, ("max_tokens",), 1)
        prompts, generate = await prep.off_loop("prompt", prep.encode_prompts, req.prompt), req.max_tokens != 0
        grammar = await prep.grammar_for(req, []) if generate else None
        jobs = []
        for ids, _, _ in prompts:
            left = prep.room(ids, "prompt", need=1 if generate else 0)
            if generate:
                jobs += [(ids, p) for p in prep.sampling(req, req.max_tokens or left, req.logprobs, [], grammar)]
        # choice k = prompt k // n, sample k % n (OpenAI's order); echo is per prompt
        owner = [k // req.n for k in range(len(prompts) * req.n)]
        echo = [("", [], []) for _ in prompts]
        if req.echo:
            scored = [[] for _ in prompts]
            if req.logprobs is not None:  # all prompts in one batched scoring pass
                scored = await asyncio.to_thread(engine.prompt_logprobs_many,
                                                 [ids for ids, _, _ in prompts], req.logprobs)
            for pi, (ids, added, text) in enumerate(prompts):
                lps = scored[pi][added:]
                # as OpenAI: the first echoed token has no logprob (and no alternatives), also
                # when it was scored after the BOS we prepended
                lps[:1] = [(None, [])] * len(lps[:1])
                echo[pi] = (text, ids[added:], lps)
        base = [len(prompts[pi][2]) for pi in owner]  # OpenAI offsets count from the prompt's start
        handles = prep.submit_all(jobs, "prompt", req.n) if jobs else []
        ctx = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": engine.model_name}
        prompt_tokens = sum(len(ids) for ids, _, _ in prompts)

        def echo_lp(pi: int):
            _, ids, lps = echo[pi]
            if req.logprobs is None or not req.echo:
                return None
            return R.legacy_logprobs(tok, ids, lps, 0)

        if req.stream:
            first = [R.CompletionResponse(choices=[R.CompletionChoice(
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
                gen = R.legacy_logprobs(tok, [e.token_id for e in events], R.event_logprobs(events), base[k])
                lp = gen if lp is None else R.CompletionLogprobs(
                    **{f: getattr(lp, f) + getattr(gen, f) for f in R.CompletionLogprobs.model_fields})
            elif req.logprobs is not None and lp is None:
                lp = R.CompletionLogprobs()
            choices.append(R.CompletionChoice(index=k, text=echo[pi][0] + joined_text(events, fin),
                                              logprobs=lp, finish_reason=fin.reason if fin else "length"))
        metrics.record_request(endpoint, prompt_tokens, done, t0)
        usage = R.Usage(prompt_tokens=prompt_tokens, completion_tokens=done, total_tokens=prompt_tokens + done)
        return R.CompletionResponse(choices=choices, usage=usage, **ctx)

    @app.post("/v1/chat/completions", response_model=R.ChatCompletionResponse,
              responses={**GENERATION_ERRORS, **_sse("ChatCompletionChunk")})
    async def chat_completions(req: P.ChatCompletionRequest, request: Request):
        t0, endpoint = time.perf_counter(), "/v1/chat/completions"
        prep.check_ready(req.model)
        if req.top_logprobs and not req.logprobs:
            raise APIError(400, "top_logprobs requires logprobs=true", param="top_logprobs")
        prep.check_new_tokens(req, ("max_completion_tokens", "max_tokens"), 4)
        # the template lists tools as the client defined them (name, description, parameters)
        tools = [t.function.model_dump(include={"name", "description", "parameters"}, exclude_none=True)
                 for t in req.tools or []]
        grammar = await prep.grammar_for(req, tools)
        parser = None if not tools or req.tool_choice == "none" else {t["name"] for t in tools}
        ids, pics = await prep.render_messages(req.messages, True, tools)
        left = prep.room(ids, "messages")
        top = (req.top_logprobs or 0) if req.logprobs else None
        # the chat template closes every turn with <|end|>: that is where the assistant stops
        max_new = req.max_completion_tokens or req.max_tokens or left
        # a grammar's parser states are built per choice: off the loop, like the tokenizer work
        params = (await asyncio.to_thread(prep.sampling, req, max_new, top, [tok.end_id], grammar) if grammar
                  else prep.sampling(req, max_new, top, [tok.end_id]))
        handles = prep.submit_all([(ids, p) for p in params], "messages", req.n, pics)
        ctx = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": engine.model_name}
        if req.stream:
            first = [R.ChatCompletionChunk(choices=[R.ChatChunkChoice(
                index=k, delta=R.ChatDelta(role="assistant", content=""))], **ctx).model_dump(exclude={"usage"})
                for k in range(req.n)]
            finished: set = set()
            body = stream_events("chat", handles, ctx, first, [0] * req.n, finished, req, len(ids), metrics,
                           endpoint, t0, tok, top, tool_names=parser)
            return EventStream(body, handles, finished)
        results = await collect(request, handles, metrics, endpoint, t0)
        choices = []
        for k, (events, fin) in enumerate(results):
            content, calls, reason = joined_text(events, fin), [], fin.reason
            if parser is not None:
                content, calls = ToolCallParser(parser).parse(content)
                reason = "tool_calls" if calls and reason == "stop" else reason
            message = R.ChatResponseMessage(content=content, tool_calls=calls or None)
            choices.append(R.ChatChoice(index=k, message=message, finish_reason=reason,
                                        logprobs=R.chat_logprobs(tok, events) if top is not None else None))
        done = sum(fin.completion_tokens for _, fin in results)
        metrics.record_request(endpoint, len(ids), done, t0)
        usage = R.Usage(prompt_tokens=len(ids), completion_tokens=done, total_tokens=len(ids) + done)
        return R.ChatCompletionResponse(choices=choices, usage=usage, **ctx)

    return app
