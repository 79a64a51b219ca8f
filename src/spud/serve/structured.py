"""Structured output: grammars that constrain generation (JSON schema, JSON object, tool calls).

The grammar engine is `llguidance` (Microsoft's low-level guidance library, the one vLLM and
SGLang also ship). Why it over the alternatives:
- it builds its token trie straight from a `tokenizers` JSON string, so Spud's byte-level BPE
  (and its special tokens, which can never match grammar text) works as is; no `transformers`;
- its wheel is one 3 MB Rust extension with no dependencies and runs on CPU; `xgrammar` pulls in
  triton and transformers, `outlines-core` would need its own index per regex/schema and has no
  Lark grammars (which tool calls need: fixed text around an embedded JSON schema);
- masks are computed lazily per step (tens of microseconds for our vocabularies), so a schema
  costs nothing up front and there is no per-schema compile cache to manage.

One `GrammarCompiler` per served tokenizer turns request fields into grammar strings (validated:
a bad schema is the client's 400); each constrained sequence gets its own `Constraint` (the
llguidance matcher, i.e. the parser state). The engine asks `apply_constraints` for the batch's
masked logits before sampling and feeds every sampled token back with `Constraint.consume`.
The end tokens are allowed only where the grammar accepts, so a finished answer always parses;
an answer cut by max_tokens ends with finish_reason "length" (as OpenAI: clients must check it).
"""

from __future__ import annotations

import json
import threading

import torch

from spud.errors import SpudError

# Compact JSON, but with json.dumps' separators: the chat template renders earlier tool calls with
# json.dumps, so generated calls and rendered ones look the same to the model.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(SpudError):
    """The request's schema / tool definitions cannot be compiled (the API answers 400)."""


class GrammarCompiler:
    """Request fields → validated llguidance grammar strings, and grammar → fresh Constraint.

    `vocab_size` is the model's (maybe padded) vocabulary: masks have one entry per logit; ids
    past the tokenizer's own are never allowed. `end_ids`: the tokens that may end a
    constrained answer (the engine finishes on them), allowed only where the grammar accepts."""

    def __init__(self, tokenizer, vocab_size: int, end_ids: list[int]) -> None:
        self._tokenizer, self.vocab_size, self.end_ids = tokenizer, vocab_size, list(end_ids)
        self._lock = threading.Lock()
        self._ll = None

    def ll_tokenizer(self):
        """Built on first use (a few ms for small vocabularies, ~1 s for 100k): servers that never
        see a constrained request never pay it."""
        import llguidance

        with self._lock:
            if self._ll is None:
                self._ll = llguidance.LLTokenizer(self._tokenizer.backend.to_str(),
                                                  n_vocab=self.vocab_size, eos_token=self.end_ids)
            return self._ll

    # ------------------------------------------------------------------------ grammars
    def json_schema(self, schema: dict) -> str:
        from llguidance import LLMatcher

        if not isinstance(schema, dict):
            raise GrammarError("the JSON schema must be an object")
        try:
            grammar = LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        except (ValueError, TypeError) as e:
            raise GrammarError(f"invalid JSON schema: {e}") from None
        return self._validated(grammar, "invalid JSON schema")

    def json_object(self) -> str:
        return self.json_schema({"type": "object"})

    def tool_calls(self, functions: list[dict], parallel: bool) -> str:
        """`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, the name one of
        `functions` (dicts with name / parameters) and the arguments valid for its parameters;
        one call, or several separated by newlines when `parallel`. The format is the chat
        template's (spud.tokenizer.TOOL_CALL_OPEN/CLOSE)."""
        from llguidance import LLMatcher

        from spud.tokenizer import TOOL_CALL_CLOSE, TOOL_CALL_OPEN

        alternatives = []
        for f in functions:
            params = f.get("parameters") or {"type": "object", "properties": {}}
            alternatives.append({
                "type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                "properties": {"name": {"const": f["name"]}, "arguments": params}})
        call = {"anyOf": alternatives} if len(alternatives) > 1 else alternatives[0]
        call = {**call, "x-guidance": JSON_OPTIONS}
        more = f' ("\\n" {_lark_str(TOOL_CALL_OPEN)} call {_lark_str(TOOL_CALL_CLOSE)})*' if parallel else ""
        lark = (f"start: {_lark_str(TOOL_CALL_OPEN)} call {_lark_str(TOOL_CALL_CLOSE)}{more}\n"
                f"call: %json {json.dumps(call)}\n")
        return self._validated(LLMatcher.grammar_from_lark(lark), "invalid tool parameters schema")

    def _validated(self, grammar: str, what: str) -> str:
        from llguidance import LLMatcher

        is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar, self.ll_tokenizer())
        if is_error:
            raise GrammarError(f"{what}: {messages[0] if messages else 'rejected'}")
        return grammar

    def constraint(self, grammar: str) -> Constraint:
        """A fresh parser state for one sequence (each choice of a request needs its own)."""
        from llguidance import LLMatcher

        m = LLMatcher(self.ll_tokenizer(), grammar, log_level=0)
        if m.is_error():
            raise GrammarError(m.get_error())
        return Constraint(m, self.vocab_size)


def _lark_str(s: str) -> str:
    return json.dumps(s)  # a JSON string literal is a valid Lark string literal


class Constraint:
    """One sequence's grammar state. Engine thread only (after it has been submitted)."""

    def __init__(self, matcher, vocab_size: int) -> None:
        self.matcher, self.vocab_size = matcher, vocab_size
        self.words = (vocab_size + 31) // 32

    def fill_mask(self, row: torch.Tensor) -> None:
        """Write the allowed-token bitmask (int32 words, bit j of word i = token 32·i + j)."""
        self.matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())

    def consume(self, token: int) -> None:
        if not self.matcher.consume_token(int(token)):
            raise SpudError(f"structured output: the grammar rejected token {token} "
                            f"({self.matcher.get_error() or 'no error given'})")

    @property
    def error(self) -> str | None:
        return self.matcher.get_error() if self.matcher.is_error() else None


_BITS = torch.arange(32, dtype=torch.int32)
_EXECUTOR = None


def _executor():
    global _EXECUTOR
    if _EXECUTOR is None:
        from llguidance import LLExecutor

        _EXECUTOR = LLExecutor()
    return _EXECUTOR


def apply_constraints(logits: torch.Tensor, constraints: list[Constraint | None]) -> torch.Tensor:
    """(B, V) logits → the same with every token a row's grammar forbids at -inf. Rows without a
    constraint are untouched. One CPU bitmask for the whole batch (unconstrained rows all ones),
    unpacked, moved and applied with one `where`: no row gather/scatter, whose advanced indexing
    cost milliseconds per step on a busy CPU (measured, see docs/serving.md)."""
    if all(c is None for c in constraints):
        return logits
    b, v = logits.shape
    words = (v + 31) // 32
    bits = torch.full((b, words), -1, dtype=torch.int32)  # -1: every bit set, all allowed
    rows = [(c.matcher, j) for j, c in enumerate(constraints) if c is not None and c.words == words]
    if len(rows) > 1:  # all rows' masks at once, on llguidance's threads without the GIL
        _executor().unsafe_compute_mask_ptr(rows, bits.data_ptr(), words * 4, b)
    for j, c in enumerate(constraints):
        if c is not None and not (len(rows) > 1 and c.words == words):
            c.fill_mask(bits[j, :c.words])
            bits[j, c.words:] = 0  # ids past the grammar's vocabulary are never text
    allowed = ((bits[:, :, None] >> _BITS) & 1).reshape(b, -1)[:, :v].bool()
    for j, c in enumerate(constraints):
        if c is not None and c.vocab_size < v:
            allowed[j, c.vocab_size:] = False
    return torch.where(allowed.to(logits.device), logits, float("-inf"))


# ------------------------------------------------------------------------------ tool calls
def _tool_markers() -> tuple[str, str]:
    from spud.tokenizer import TOOL_CALL_CLOSE, TOOL_CALL_OPEN

    return TOOL_CALL_OPEN, TOOL_CALL_CLOSE


def _parse_call(body: str, names: set[str]) -> dict | None:
    """The JSON between the markers → an OpenAI tool call, or None when it is not a call of one
    of `names` (then the text stays content: nothing the model wrote is dropped)."""
    import uuid

    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not (isinstance(obj, dict) and obj.get("name") in names and isinstance(obj.get("arguments", {}), dict)):
        return None
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": obj["name"],
                         "arguments": json.dumps(obj.get("arguments", {}), ensure_ascii=False)}}


class ToolCallParser:
    """Splits generated text into content and tool calls, incrementally (for streaming) or at once.

    `push` returns the text that is surely content and the calls completed so far; text that
    may be the start of a call (a prefix of the open marker, or an open call without its close
    marker yet) is held back until it is decided. `finish` releases what is left as content."""

    def __init__(self, names: set[str]) -> None:
        self.names, self.buf, self.calls = set(names), "", 0
        self.open, self.close = _tool_markers()

    def push(self, text: str) -> tuple[str, list[dict]]:
        self.buf += text
        out, calls = "", []
        while True:
            i = self.buf.find(self.open)
            if i < 0:
                keep = _partial_suffix(self.buf, self.open)
                cut = len(self.buf) - keep
                out, self.buf = out + self.buf[:cut], self.buf[cut:]
                break
            j = self.buf.find(self.close, i)
            if j < 0:
                out, self.buf = out + self.buf[:i], self.buf[i:]
                break
            call = _parse_call(self.buf[i + len(self.open):j], self.names)
            end = j + len(self.close)
            if call is None:
                out += self.buf[:end]
            else:
                out += self.buf[:i]
                calls.append(call)
            self.buf = self.buf[end:]
        self.calls += len(calls)
        if self.calls and not out.strip():
            out = ""  # the newlines between calls are layout, not content
        return out, calls

    def finish(self) -> str:
        out, self.buf = self.buf, ""
        return "" if self.calls and not out.strip() else out

    def parse(self, text: str) -> tuple[str | None, list[dict]]:
        """Whole text → (content, calls); content None when the answer is only calls."""
        out, calls = self.push(text)
        out += self.finish()
        if calls:
            out = out.strip()
            return out or None, calls
        return out, calls


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a proper prefix of `marker`."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
