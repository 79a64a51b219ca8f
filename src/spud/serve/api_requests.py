"""Turning a validated API request into engine work: checks, sampling params, grammars, prompt ids."""

from __future__ import annotations

import asyncio
import functools

from fastapi import FastAPI

from spud.errors import SpudError
from spud.serve import images
from spud.serve import protocol as P
from spud.serve.engine import ContextLengthError, QueueFullError, SamplingParams
from spud.serve.streaming import APIError
from spud.serve.structured import GrammarCompiler, GrammarError


class RequestPrep:
    """One per app (api.create_app): what the routes call to check a request against the served
    model (name, vocabulary, context) and to turn it into token ids, SamplingParams and engine
    requests. Whatever the client got wrong is raised as an APIError in OpenAI's error shape."""

    def __init__(self, app: FastAPI, engine, tok, vocab: int, grammars: GrammarCompiler) -> None:
        self.app, self.engine, self.tok, self.vocab, self.grammars = app, engine, tok, vocab, grammars

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.engine.model_name:
            raise APIError(404, f"model {model!r} does not exist; this server serves {self.engine.model_name!r}",
                           param="model", code="model_not_found")

    def check_ready(self, model: str | None) -> None:
        self.check_model(model)
        if self.app.state.draining:
            raise APIError(503, "server is shutting down", code="shutting_down")

    def check_ids(self, ids: list[int], param: str) -> None:
        bad = [i for i in ids if not 0 <= i < self.vocab]
        if bad:
            raise APIError(400, f"{param}: token id {bad[0]} is outside the vocabulary [0, {self.vocab})",
                           param=param)

    def room(self, ids: list[int], param: str, need: int = 1) -> int:
        """Tokens left after the prompt; 400 (stating both numbers) when not even `need` fit."""
        left = self.engine.max_context - len(ids)
        if left < need:
            raise APIError(400, f"the prompt is {len(ids)} tokens but the model's context is {self.engine.max_context}"
                           "; shorten it", param=param, code="context_length_exceeded")
        return left

    def check_new_tokens(self, req, fields: tuple[str, ...], shortest_prompt: int) -> None:
        """The documented maximum (protocol.NewTokens): even the shortest prompt leaves no room."""
        for field in fields:
            value = getattr(req, field)
            if value is not None and value > self.engine.max_context - shortest_prompt:
                raise APIError(400, f"{field}: {value} tokens can never fit: the model's context is "
                               f"{self.engine.max_context} tokens and a prompt takes at least {shortest_prompt}",
                               param=field, code="context_length_exceeded")

    def sampling(self, req, max_tokens: int, top: int | None, stop_ids: list[int],
                 grammar: str | None = None) -> list[SamplingParams]:
        bias = {int(k): float(v) for k, v in (req.logit_bias or {}).items()}
        self.check_ids(list(bias), "logit_bias")
        return [SamplingParams(
            # structured output: each choice gets its own parser state
            constraint=self.grammars.constraint(grammar) if grammar else None,
            max_tokens=max_tokens, temperature=float(req.temperature), top_p=float(req.top_p),
            top_k=max(req.top_k, 0), min_p=float(req.min_p), presence_penalty=float(req.presence_penalty),
            frequency_penalty=float(req.frequency_penalty), logit_bias=bias or None,
            # each choice gets its own seed, or n seeded choices would all be identical
            seed=req.choice_seed(i), stop=req.stop_list(),
            stop_token_ids=list(stop_ids), logprobs=top,
        ) for i in range(req.n)]

    async def grammar_for(self, req, tools: list[dict]) -> str | None:
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
            fn, args, param = self.grammars.tool_calls, (forced, parallel), "tools"
        elif req.response_format is None or req.response_format.type == "text":
            return None
        elif req.response_format.type == "json_object":
            fn, args, param = self.grammars.json_object, (), "response_format"
        else:
            spec = req.response_format.json_schema
            if spec.schema_ is None:
                raise APIError(400, "response_format.json_schema.schema is required",
                               param="response_format.json_schema.schema")
            fn, args, param = self.grammars.json_schema, (spec.schema_,), "response_format.json_schema.schema"
        try:
            return await asyncio.to_thread(fn, *args)
        except GrammarError as e:
            raise APIError(400, f"{param}: {e}", param=param) from None

    def submit_all(self, jobs: list[tuple[list[int], SamplingParams]], param: str, n: int, pics=None) -> list:
        # More sequences than the queue can ever hold is the request's fault, not the load's:
        # retrying a 429 would never help, so say what to change.
        if len(jobs) > self.engine.max_queue:
            raise APIError(400, f"this request needs {len(jobs)} sequences ({len(jobs) // n} prompt(s) × n={n}) "
                           f"but the server queues at most {self.engine.max_queue}; send fewer prompts or a "
                           "smaller n per request", param="n" if n > 1 else param, code="too_many_sequences")
        handles = []
        try:
            for ids, params in jobs:
                handles.append(self.engine.submit(ids, params, **({"images": pics} if pics else {})))
        except BaseException as e:
            for h in handles:  # all or nothing: never leave some of the choices running
                h.cancel()
            if isinstance(e, QueueFullError):
                raise APIError(429, f"server is busy, retry later ({e})", code="queue_full",
                               headers={"Retry-After": "1"}) from None
            if isinstance(e, ContextLengthError):
                raise APIError(400, str(e), param=param, code="context_length_exceeded") from None
            if isinstance(e, SpudError):
                raise APIError(503 if self.app.state.draining else 400, str(e), param=param) from None
            raise
        return handles

    async def off_loop(self, param: str, fn, *args):
        """Tokenizer work in a worker thread (see api.py's module doc); its SpudErrors are the client's."""
        try:
            return await asyncio.to_thread(fn, *args)
        except SpudError as e:
            raise APIError(400, f"{param}: {e}", param=param) from None

    async def render_messages(self, messages: list[P.ChatMessage], generation_prompt: bool,
                              tools: list[dict] | None = None) -> tuple[list[int], object | None]:
        """→ (ids, the request's decoded images for the engine, or None). Message text is plain
        text: only the template adds control ids (tokenizer.py); images become placeholder ids."""
        refs = images.find_images(messages)
        images.check_request(refs, self.engine)
        plain = []
        for m in messages:
            d = {"role": "system" if m.role == "developer" else m.role, "content": images.template_content(m)}
            if m.tool_calls:
                d["tool_calls"] = [c.model_dump() for c in m.tool_calls]
            plain.append(d)
        render = self.tok.render_chat
        if refs:
            render = functools.partial(render, image_tokens=images.vision_of(self.engine).tokens_per_image)
        ids = (await self.off_loop("messages", render, plain, generation_prompt, tools))[0]
        return ids, (await asyncio.to_thread(images.load_images, refs, self.engine) if refs else None)

    def encode_prompts(self, prompt) -> list[tuple[list[int], int, str]]:
        """→ [(ids for the engine, how many BOS we prepended, the prompt's text)] per prompt.
        Text prompts are plain text (no control ids); id prompts are taken as given."""
        if isinstance(prompt, str) or isinstance(prompt[0], int):
            prompt = [prompt]
        out = []
        for p in prompt:
            if isinstance(p, str):
                ids, text = self.tok.encode(p), p
            else:
                self.check_ids(p, "prompt")
                ids, text = list(p), self.tok.decode(p)
            # base models saw BOS open every training document; without it they are off-distribution
            added = 0 if ids and ids[0] == self.tok.bos_id else 1
            out.append(([self.tok.bos_id] * added + ids, added, text))
        return out
