"""Response schemas of the OpenAI-compatible API, and the engine events → response shapes."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, model_serializer


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "spud"
    max_model_len: int
    # which model of the run is served ("base" or "chat") and from which checkpoint directory
    spud_model: str | None = None
    checkpoint: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogprobs(BaseModel):
    """The legacy shape lm-evaluation-harness parses."""

    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatChoiceLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ResponseFunction(BaseModel):
    name: str
    arguments: str


class ResponseToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ResponseFunction


class _OmitNoToolCalls(BaseModel):
    """`tool_calls` appears only when there are calls (answers without tools look as before)."""

    @model_serializer(mode="wrap")
    def _omit(self, handler):
        out = handler(self)
        if out.get("tool_calls", 0) is None:
            del out["tool_calls"]
        return out


class ChatResponseMessage(_OmitNoToolCalls):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ResponseToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaToolCall(ResponseToolCall):
    index: int  # which call of the message (a streamed call arrives whole, in one chunk)


class ChatDelta(_OmitNoToolCalls):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(BaseModel):
    prompt: str


# ------------------------------------------------------- engine events → response shapes
# Token strings are decoded one id at a time: for a byte-level BPE a token can end inside a UTF-8
# character, so a piece may show U+FFFD while the joined text is exact. OpenAI behaves the same.
def token_str(tok, token_id: int) -> str:
    return tok.decode([token_id])


def legacy_logprobs(tok, ids: list[int], lps: list[tuple[float | None, list]], offset: int) -> CompletionLogprobs:
    """(ids, [(logprob, [(alt id, alt logprob)])]) → the /v1/completions shape. `offset` is where
    the first token starts in the choice's text, so text_offset indexes that text."""
    out = CompletionLogprobs()
    for i, (lp, alts) in zip(ids, lps):
        s = token_str(tok, i)
        out.tokens.append(s)
        out.token_logprobs.append(lp)
        out.top_logprobs.append({token_str(tok, a): v for a, v in alts} if lp is not None else None)
        out.text_offset.append(offset)
        offset += len(s)
    return out


def event_logprobs(events) -> list[tuple[float | None, list]]:
    return [(e.logprob, list(e.top_logprobs or [])) for e in events]


def chat_logprobs(tok, events) -> ChatChoiceLogprobs:
    def entry(i: int, lp: float, cls=TopLogprob):
        s = token_str(tok, i)
        return cls(token=s, logprob=lp, bytes=list(s.encode("utf-8")))

    content = []
    for e in events:
        item = entry(e.token_id, e.logprob if e.logprob is not None else 0.0, ChatTokenLogprob)
        item.top_logprobs = [entry(a, v) for a, v in (e.top_logprobs or [])]
        content.append(item)
    return ChatChoiceLogprobs(content=content)
