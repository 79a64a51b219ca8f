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
import functools
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from spud.errors import SpudError
from spud.serve import images
from spud.serve import protocol as P
from spud.serve import protocol_responses as R
from spud.serve.boundary import Guard, http_error, openapi_document, server_error, validation_error
from spud.serve.engine import ContextLengthError, QueueFullError, SamplingParams
from spud.serve.metrics import ServerMetrics
from spud.serve.structured import GrammarCompiler, GrammarError, ToolCallParser
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

    def card() -> R.ModelCard:
        return R.ModelCard(id=engine.model_name, created=started, max_model_len=engine.max_context,
                           spud_model=getattr(engine, "model_kind", None),
                           checkpoint=getattr(engine, "checkpoint", None))

    def check_model(model: str | None) -> None:
        if model is not None and model != engine.model_name:
            raise APIError(404, f"model {model!r} does not exist; this server serves {engine.model_name!r}",
                           param="model", code="model_not_found")

    def check_ready(model: str | None) -> None:
        check_model(model)
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

    def check_new_tokens(req, fields: tuple[str, ...], shortest_prompt: int) -> None:
        """The documented maximum (protocol.NewTokens): even the shortest prompt leaves no room."""
        for field in fields:
            value = getattr(req, field)
            if value is not None and value > engine.max_context - shortest_prompt:
                raise APIError(400, f"{field}: {value} tokens can never fit: the model's context is "
                               f"{engine.max_context} tokens and a prompt takes at least {shortest_prompt}",
                               param=field, code="context_length_exceeded")

    def sampling(req, max_tokens: int, top: int | None, stop_ids: list[int],
                 grammar: str | None = None) -> list[SamplingParams]:
        bias = {int(k): float(v) for k, v in (req.logit_bias or {}).items()}
        check_ids(list(bias), "logit_bias")
        return [SamplingParams(
            # structured output: each choice gets its own parser state
            constraint=grammars.constraint(grammar) if grammar else None,
            max_tokens=max_tokens, temperature=float(req.temperature), top_p=float(req.top_p),
            top_k=max(req.top_k, 0), min_p=float(req.min_p), presence_penalty=float(req.presence_penalty),
            frequency_penalty=float(req.frequency_penalty), logit_bias=bias or None,
            # each choice gets its own seed, or n seeded choices would all be identical
            seed=req.choice_seed(i), stop=req.stop_list(),
            stop_token_ids=list(stop_ids), logprobs=top,
        ) for i in range(req.n)]

    async def grammar_for(req, tools: list[dict]) -> str | None:
        """The grammar that constrains this request, if any: a forced tool call (tool_choice
        "required" or a named function) wins over response_format. Schemas the grammar engine
        cannot compile are the client's 400, naming the parameter."""
        choice = getattr(req, "tool_choice", None)
        if isinstance(choice, P.NamedToolChoice) or choice == "required":
            if not tools:
                raise APIError(400, "tool_choice: a tool call was required but the request has no tools",
                               param="tool_choice")
            forced = tools
            if isinstance(choice, P.NamedToolChoice):
                forced = [t for t in tools if t["name"] == choice.function.name]
                if not forced:
                    raise APIError(400, f"tool_choice: unknown tool {choice.function.name!r}; the request's "
                                   f"tools are {[t['name'] for t in tools]}", param="tool_choice")
            parallel = req.parallel_tool_calls and not isinstance(choice, P.NamedToolChoice)
            fn, args, param = grammars.tool_calls, (forced, parallel), "tools"
        elif req.response_format is None or req.response_format.type == "text":
            return None
        elif req.response_format.type == "json_object":
            fn, args, param = grammars.json_object, (), "response_format"
        else:
            spec = req.response_format.json_schema
            if spec.schema_ is None:
                raise APIError(400, "response_format.json_schema.schema is required",
                               param="response_format.json_schema.schema")
            fn, args, param = grammars.json_schema, (spec.schema_,), "response_format.json_schema.schema"
        try:
            return await asyncio.to_thread(fn, *args)
        except GrammarError as e:
            raise APIError(400, f"{param}: {e}", param=param) from None

    def submit_all(jobs: list[tuple[list[int], SamplingParams]], param: str, n: int, pics=None) -> list:
        # More sequences than the queue can ever hold is the request's fault, not the load's:
        # retrying a 429 would never help, so say what to change.
        if len(jobs) > engine.max_queue:
            raise APIError(400, f"this request needs {len(jobs)} sequences ({len(jobs) // n} prompt(s) × n={n}) "
                           f"but the server queues at most {engine.max_queue}; send fewer prompts or a "
                           "smaller n per request", param="n" if n > 1 else param, code="too_many_sequences")
        handles = []
        try:
            for ids, params in jobs:
                handles.append(engine.submit(ids, params, **({"images": pics} if pics else {})))
        except BaseException as e:
            for h in handles:  # all or nothing: never leave some of the choices running
                h.cancel()
            if isinstance(e, QueueFullError):
                raise APIError(429, f"server is busy, retry later ({e})", code="queue_full",
                               headers={"Retry-After": "1"}) from None
            if isinstance(e, ContextLengthError):
                raise APIError(400, str(e), param=param, code="context_length_exceeded") from None
            if isinstance(e, SpudError):
                raise APIError(503 if app.state.draining else 400, str(e), param=param) from None
            raise
        return handles

    async def off_loop(param: str, fn, *args):
        """Tokenizer work in a worker thread (see module doc); its SpudErrors are the client's."""
        try:
            return await asyncio.to_thread(fn, *args)
        except SpudError as e:
            raise APIError(400, f"{param}: {e}", param=param) from None

    async def render_messages(messages: list[P.ChatMessage], generation_prompt: bool,
                              tools: list[dict] | None = None) -> tuple[list[int], object | None]:
        """→ (ids, the request's decoded images for the engine, or None). Message text is plain
        text: only the template adds control ids (tokenizer.py); images become placeholder ids."""
        refs = images.find_images(messages)
        images.check_request(refs, engine)
        plain = []
        for m in messages:
            d = {"role": "system" if m.role == "developer" else m.role, "content": images.template_content(m)}
            if m.tool_calls:
                d["tool_calls"] = [c.model_dump() for c in m.tool_calls]
            plain.append(d)
        render = tok.render_chat
        if refs:
            render = functools.partial(render, image_tokens=images.vision_of(engine).tokens_per_image)
        ids = (await off_loop("messages", render, plain, generation_prompt, tools))[0]
        return ids, (await asyncio.to_thread(images.load_images, refs, engine) if refs else None)

    def encode_prompts(prompt) -> list[tuple[list[int], int, str]]:
        """→ [(ids for the engine, how many BOS we prepended, the prompt's text)] per prompt.
        Text prompts are plain text (no control ids); id prompts are taken as given."""
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
            check_ready(model_id)
        return card()

    @app.post("/tokenize", response_model=R.TokenizeResponse, responses=_errors(400, 404, 413))
    async def tokenize(req: P.TokenizeRequest):
        """Exactly the ids the generation endpoints would use: text is always plain text."""
        check_model(req.model)
        if req.prompt is not None:
            ids = await off_loop("prompt", tok.encode, req.prompt, req.add_special_tokens)
        else:
            ids, _ = await render_messages(req.messages, req.add_special_tokens)
        # a 1 MB prompt is ~10^5-10^6 ids: serialise them off the loop too
        body = await asyncio.to_thread(lambda: R.TokenizeResponse(
            tokens=ids, count=len(ids), max_model_len=engine.max_context).model_dump_json())
        return Response(body, media_type="application/json")

    @app.post("/detokenize", response_model=R.DetokenizeResponse, responses=_errors(400, 404, 413))
    async def detokenize(req: P.DetokenizeRequest):
        check_model(req.model)
        check_ids(req.tokens, "tokens")
        return R.DetokenizeResponse(prompt=await off_loop("tokens", tok.decode, req.tokens))

    @app.post("/v1/completions", response_model=R.CompletionResponse,
              responses={**GENERATION_ERRORS, **_sse("CompletionResponse")})
    async def completions(req: P.CompletionRequest, request: Request):
        t0, endpoint = time.perf_counter(), "/v1/completions"
        check_ready(req.model)
        if req.max_tokens == 0 and not req.echo:
            raise APIError(400, "max_tokens=0 is only allowed with echo=true (prompt scoring)", param="max_tokens")
        check_new_tokens(req, ("max_tokens",), 1)
        prompts, generate = await off_loop("prompt", encode_prompts, req.prompt), req.max_tokens != 0
        grammar = await grammar_for(req, []) if generate else None
        jobs = []
        for ids, _, _ in prompts:
            left = room(ids, "prompt", need=1 if generate else 0)
            if generate:
                jobs += [(ids, p) for p in sampling(req, req.max_tokens or left, req.logprobs, [], grammar)]
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
        handles = submit_all(jobs, "prompt", req.n) if jobs else []
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
        check_ready(req.model)
        if req.top_logprobs and not req.logprobs:
            raise APIError(400, "top_logprobs requires logprobs=true", param="top_logprobs")
        check_new_tokens(req, ("max_completion_tokens", "max_tokens"), 4)
        # the template lists tools as the client defined them (name, description, parameters)
        tools = [t.function.model_dump(include={"name", "description", "parameters"}, exclude_none=True)
                 for t in req.tools or []]
        grammar = await grammar_for(req, tools)
        parser = None if not tools or req.tool_choice == "none" else {t["name"] for t in tools}
        ids, pics = await render_messages(req.messages, True, tools)
        left = room(ids, "messages")
        top = (req.top_logprobs or 0) if req.logprobs else None
        # the chat template closes every turn with <|end|>: that is where the assistant stops
        max_new = req.max_completion_tokens or req.max_tokens or left
        # a grammar's parser states are built per choice: off the loop, like the tokenizer work
        params = (await asyncio.to_thread(sampling, req, max_new, top, [tok.end_id], grammar) if grammar
                  else sampling(req, max_new, top, [tok.end_id]))
        handles = submit_all([(ids, p) for p in params], "messages", req.n, pics)
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
