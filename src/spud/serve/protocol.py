"""Request/response schemas of the OpenAI-compatible API, declared once.

These pydantic models are the single source of truth: FastAPI validates bodies with them, the
validation errors they raise become OpenAI-shaped 400s (with `param` = the field path), and the
OpenAPI document at /docs is generated from them. Number fields are strict (no "0.5" → 0.5
coercion, no true → 1): a client sending the wrong type has a bug we should report, not guess at.
Unknown fields are ignored, as OpenAI does, because clients (lm-eval, LangChain) send extras.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    field_validator,
    model_validator,
)

# Strict ints are accepted where floats are expected (JSON has one number type), strings are not.
Number = StrictFloat | StrictInt
MAX_N = 16  # choices per request: each is a full sequence slot, so n is a cost multiplier
MAX_STOP = 4
MAX_TOP_LOGPROBS = 20


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Request):
    include_usage: StrictBool = False


class _SamplingFields(_Request):
    """Parameters shared by /v1/completions and /v1/chat/completions."""

    model: StrictStr
    temperature: Annotated[Number, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[Number, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[StrictInt, Field(ge=-1, description="0 or -1 = off")] = 0
    min_p: Annotated[Number, Field(ge=0, le=1)] = 0.0
    presence_penalty: Annotated[Number, Field(ge=-2, le=2)] = 0.0
    frequency_penalty: Annotated[Number, Field(ge=-2, le=2)] = 0.0
    logit_bias: dict[StrictStr, Annotated[Number, Field(ge=-100, le=100)]] | None = None
    seed: StrictInt | None = None
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=MAX_STOP)] | None = None
    n: Annotated[StrictInt, Field(ge=1, le=MAX_N)] = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None  # accepted for compatibility; not used

    @field_validator("logit_bias")
    @classmethod
    def _bias_keys_are_ids(cls, v: dict | None) -> dict | None:
        # OpenAI keys are token ids as strings; range against the vocab is checked in api.py,
        # where the tokenizer is known.
        for k in v or {}:
            if not k.lstrip("-").isdigit():
                raise ValueError(f"logit_bias keys must be token ids (integers as strings), got {k!r}")
        return v

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        return [s for s in stops if s]


PromptType = StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]


class CompletionRequest(_SamplingFields):
    prompt: PromptType
    max_tokens: Annotated[StrictInt, Field(ge=0)] | None = 16
    echo: StrictBool = False
    logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty(cls, v):
        if isinstance(v, list) and (not v or any(isinstance(p, list) and not p for p in v)):
            raise ValueError("prompt must not be empty")
        return v


class TextPart(_Request):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(_Request):
    # "developer" is what newer OpenAI clients send instead of "system".
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart]
    name: StrictStr | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None


class TokenizeRequest(_Request):
    model: StrictStr | None = None
    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: StrictBool = True  # BOS for a prompt; the generation prompt for messages

    @model_validator(mode="after")
    def _exactly_one(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        return self


class DetokenizeRequest(_Request):
    model: StrictStr | None = None
    tokens: list[StrictInt]


# ----------------------------------------------------------------------------------- responses
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


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


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
