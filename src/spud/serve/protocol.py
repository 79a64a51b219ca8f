"""Request schemas of the OpenAI-compatible API, declared once (responses: protocol_responses.py).

These pydantic models are the single source of truth: FastAPI validates bodies with them, the
validation errors they raise become OpenAI-shaped 400s (with `param` = the field path), and the
OpenAPI document at /docs is generated from them, so every limit the server enforces appears there
as standard JSON Schema (`minimum`, `exclusiveMinimum`, `maximum`, `minItems`, `maxItems`, ...).
Types are strict (no "0.5" → 0.5 coercion, no true → 1): a client sending the wrong type has a
bug we should report, not guess at. Two JSON-isms are accepted because JSON Schema itself says
so: an integer where a number is expected, and a number with a zero fraction (`1.0`) where an
integer is expected. Strings must be valid Unicode: JSON can carry a lone surrogate escape
("\ud800") that no tokenizer or UTF-8 encoder accepts, so it is refused here with a 400.
Unknown fields are ignored, as OpenAI does, because clients (lm-eval, LangChain) send extras.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    field_validator,
    model_validator,
)

MAX_N = 16  # choices per request: each is a full sequence slot, so n is a cost multiplier
MAX_STOP = 4
MAX_TOP_LOGPROBS = 20
# torch.Generator.manual_seed takes [-2**63, 2**64). The bounds are powers of two so that they
# survive the OpenAPI document's float limits exactly (2**64 - 1 would read as 2**64 there).
SEED_MIN, SEED_MAX = -(2**63), 2**63
TOKEN_ID_KEY = r"^(0|[1-9][0-9]{0,9})$"  # logit_bias keys: token ids as decimal strings
# Markers for limits only the running server knows (its model's name and vocabulary):
# boundary.openapi_document replaces them with standard keywords in each app's document.
MODEL_NAME, TOKEN_ID, TOKEN_ID_KEYS = "x-spud-model-name", "x-spud-token-id", "x-spud-token-id-keys"
NEW_TOKENS = "x-spud-context-minus"  # maximum = the model's context minus the shortest prompt


def NewTokens(minimum: int, shortest_prompt: int):  # noqa: N802 - a type factory
    """max_tokens-style fields: at most the context minus the shortest possible prompt (BOS for a
    completion; BOS, role, end and the assistant marker for a chat). A necessary bound only: the
    real limit depends on the prompt's length, which the server checks (400, both numbers)."""
    return Annotated[Int(ge=minimum), Field(json_schema_extra={NEW_TOKENS: shortest_prompt})]


def _integral(v):
    """1.0 → 1 (JSON Schema's "integer" includes numbers with a zero fraction); all else as is,
    for the strict int check that follows (so 1.5, true and "1" are still refused)."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


def _valid_unicode(v: str) -> str:
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"contains a lone surrogate {v[e.start]!r} at character {e.start}; "
                         "strings must be valid Unicode") from None
    return v


def Int(**limits):  # noqa: N802 - a type factory, used like a type
    """A strict integer with JSON Schema limits (ge/gt/le → minimum/exclusiveMinimum/maximum).
    The limits sit inside the before-validator so that the schema generator still sees them."""
    inner = Annotated[StrictInt, Field(**limits)] if limits else StrictInt
    return Annotated[inner, BeforeValidator(_integral)]


# A float field accepts JSON integers too (strict floats take ints, never bools or strings).
Number = StrictFloat
Text = Annotated[StrictStr, AfterValidator(_valid_unicode)]
# the upper bound is the model's vocabulary: checked in api.py, stated in each app's document
TokenId = Annotated[Int(ge=0), Field(json_schema_extra={TOKEN_ID: True})]
ModelName = Annotated[Text, Field(json_schema_extra={MODEL_NAME: True})]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Request):
    include_usage: StrictBool = False


class _SamplingFields(_Request):
    """Parameters shared by /v1/completions and /v1/chat/completions."""

    model: ModelName
    temperature: Annotated[Number, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[Number, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[Int(ge=-1), Field(description="0 or -1 = off")] = 0
    min_p: Annotated[Number, Field(ge=0, le=1)] = 0.0
    presence_penalty: Annotated[Number, Field(ge=-2, le=2)] = 0.0
    frequency_penalty: Annotated[Number, Field(ge=-2, le=2)] = 0.0
    logit_bias: Annotated[
        dict[StrictStr, Annotated[Number, Field(ge=-100, le=100)]] | None,
        Field(json_schema_extra={"propertyNames": {"pattern": TOKEN_ID_KEY}, TOKEN_ID_KEYS: True}),
    ] = None
    seed: Int(ge=SEED_MIN, le=SEED_MAX) | None = None
    stop: Text | Annotated[list[Text], Field(max_length=MAX_STOP)] | None = None
    n: Int(ge=1, le=MAX_N) = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: Text | None = None  # accepted for compatibility; not used

    @field_validator("logit_bias")
    @classmethod
    def _bias_keys_are_ids(cls, v: dict | None) -> dict | None:
        # OpenAI keys are token ids as strings; range against the vocab is checked in api.py,
        # where the tokenizer is known.
        for k in v or {}:
            if not re.fullmatch(TOKEN_ID_KEY, k):
                raise ValueError(f"logit_bias keys must be token ids (integers as strings), got {k!r}")
        return v

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        return [s for s in stops if s]

    def choice_seed(self, i: int) -> int | None:
        """Choice i's seed: seed + i, wrapped into manual_seed's range so that a seed near the
        top of the range with n > 1 cannot overflow (n seeded choices must differ)."""
        return None if self.seed is None else (self.seed + i) % 2**64


NonEmpty = Field(min_length=1)
PromptType = (Text | Annotated[list[Text], NonEmpty] | Annotated[list[TokenId], NonEmpty]
              | Annotated[list[Annotated[list[TokenId], NonEmpty]], NonEmpty])


def _requires(field: str, condition: dict, other: str, value) -> dict:
    """JSON Schema for "when `field` matches `condition`, `other` must be `value`" (if/then), for
    the cross-field rules api.py enforces, so that the document states them too."""
    return {"if": {"properties": {field: condition}, "required": [field]},
            "then": {"properties": {other: {"const": value}}, "required": [other]}}


class CompletionRequest(_SamplingFields):
    model_config = ConfigDict(json_schema_extra=_requires("max_tokens", {"const": 0}, "echo", True))

    prompt: PromptType
    max_tokens: NewTokens(0, 1) | None = 16
    echo: StrictBool = False
    logprobs: Int(ge=0, le=MAX_TOP_LOGPROBS) | None = None
    response_format: ResponseFormat | None = None


class TextPart(_Request):
    type: Literal["text"]
    text: Text


IMAGE_URL = "x-spud-image-url"  # serve/images.py checks the URL; its limits fill this marker


class ImageURL(_Request):
    url: Annotated[Text, Field(json_schema_extra={IMAGE_URL: True})]
    detail: Literal["auto", "low", "high"] = "auto"  # accepted; the model has one input size


class ImagePart(_Request):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


FunctionName = Annotated[Text, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]


class ToolCallFunction(_Request):
    name: Text
    arguments: Text  # JSON, as the model wrote it


class ToolCall(_Request):
    id: Text
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(_Request):
    # "developer" is what newer OpenAI clients send instead of "system".
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[ContentPart] | None = None
    name: Text | None = None
    tool_calls: list[ToolCall] | None = None  # assistant turns that called tools
    tool_call_id: Text | None = None  # tool turns: which call this is the result of

    @model_validator(mode="after")
    def _content_given(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is required (only an assistant message with tool_calls may omit it)")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content if p.type == "text")


class JsonSchemaFormat(_Request):
    name: FunctionName
    description: Text | None = None
    schema_: dict | None = Field(None, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type 'json_schema' and only allowed with it")
        return self


class FunctionDefinition(_Request):
    name: FunctionName
    description: Text | None = None
    parameters: dict | None = None
    strict: StrictBool | None = None


class Tool(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Request):
    name: Text


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_SamplingFields):
    model_config = ConfigDict(json_schema_extra=_requires("top_logprobs", {"type": "integer", "minimum": 1},
                                                          "logprobs", True))

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: NewTokens(1, 4) | None = None
    max_completion_tokens: NewTokens(1, 4) | None = None
    logprobs: StrictBool = False
    top_logprobs: Int(ge=0, le=MAX_TOP_LOGPROBS) | None = None
    response_format: ResponseFormat | None = None
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool = True


class TokenizeRequest(_Request):
    """Text is tokenized exactly as the generation endpoints tokenize it: always as plain text,
    so "<|end|>" inside `prompt` or a message is characters, never the control token."""

    model_config = ConfigDict(json_schema_extra={"oneOf": [  # what _exactly_one enforces
        {"required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
        {"required": ["messages"], "properties": {"messages": {"type": "array"}}}]})

    model: ModelName | None = None
    prompt: Text | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: StrictBool = Field(
        True, description="prompt: prepend BOS; messages: end with the assistant generation prompt")

    @model_validator(mode="after")
    def _exactly_one(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        return self


class DetokenizeRequest(_Request):
    model: ModelName | None = None
    tokens: list[TokenId]

