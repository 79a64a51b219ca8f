"""The serving engine's public data types: request parameters, events, errors, handles.

Kept apart from the scheduler (engine.py re-exports everything) so the HTTP layer's imports stay
light and the engine module stays about scheduling.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

from spud.errors import SpudError


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None  # same seed -> same output, also when batched with others
    stop: list[str] = field(default_factory=list)  # stop strings, excluded from output
    stop_token_ids: list[int] = field(default_factory=list)  # besides the model's end tokens
    logprobs: int | None = None  # None: none; k >= 0: sampled token's logprob + top-k
    ignore_eos: bool = False
    # structured output: a spud.serve.structured.Constraint (one per sequence, it holds the
    # parser state); the engine masks what it forbids and allows end tokens only where it accepts
    constraint: object | None = None
    # False: token events carry no text and the finish event carries all of it, decoded once
    # (offline batch generation, which streams to nobody; ignored when there are stop strings)
    incremental_text: bool = True

    def validate(self, vocab_size: int) -> None:
        """Raise SpudError naming the first bad field (the API maps it to a 400)."""
        checks = [
            (self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}"),
            (self.temperature >= 0, f"temperature must be >= 0 (0 = greedy), got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= 0, f"top_k must be >= 0 (0 = off), got {self.top_k}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (self.logprobs is None or 0 <= self.logprobs <= vocab_size,
             f"logprobs must be between 0 and {vocab_size}, got {self.logprobs}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise SpudError(msg)
        ids = list((self.logit_bias or {}).keys()) + list(self.stop_token_ids)
        bad = [i for i in ids if not 0 <= int(i) < vocab_size]
        if bad:
            raise SpudError(f"token ids {bad} in logit_bias/stop_token_ids are outside the "
                            f"vocabulary [0, {vocab_size})")


@dataclass
class TokenEvent:
    """One generated token."""

    token_id: int
    text: str  # text to append ("" while a possible stop string / partial char is held back)
    logprob: float | None  # log-softmax of the penalised, biased, temperature-1 distribution
    top_logprobs: list[tuple[int, float]] | None  # [(token_id, logprob)], when requested


@dataclass
class FinishEvent:
    reason: str  # "stop" | "length" | "cancelled" | "error"
    text: str  # held-back text released at the end ("" if a stop string consumed it)
    prompt_tokens: int
    completion_tokens: int  # includes an end / stop token that finished the request
    error: str | None = None
    end_token: int | None = None  # the end id sampled last (not in the output), if any


Event = TokenEvent | FinishEvent


class QueueFullError(SpudError):
    """submit() found max_queue requests already waiting (the API answers 429/503)."""


class ContextLengthError(SpudError):
    """prompt_tokens + max_tokens exceeds the engine's context (the API answers 400)."""


class RequestHandle:
    """The caller's side of one request: its event stream and a cancel switch.

    The engine thread pushes events; they reach whichever consumer attaches: a blocking
    iterator (queue.Queue) or `stream()` in an asyncio loop (events are forwarded with
    loop.call_soon_threadsafe, the only safe way to touch an asyncio.Queue from another thread).
    """

    def __init__(self, request_id: str, prompt_tokens: int,
                 on_cancel: Callable[[], None] | None = None) -> None:
        self.id = request_id
        self.prompt_tokens = prompt_tokens
        self.cancelled = False  # read by the engine thread at its next step
        # time.perf_counter() stamps for the server's queue-time metric; the engine sets
        # `admitted` when the request gets a slot (prefill starts)
        self.submitted = time.perf_counter()
        self.admitted: float | None = None
        self._on_cancel = on_cancel
        self._lock = threading.Lock()
        self._sync: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._async: asyncio.Queue[Event] | None = None

    def cancel(self) -> None:
        """Stop generating; the engine frees the slot and its KV memory at its next step and
        sends FinishEvent("cancelled"). Idempotent, callable from any thread."""
        if not self.cancelled:
            self.cancelled = True
            if self._on_cancel is not None:
                self._on_cancel()

    def _emit(self, ev: Event) -> None:
        """Engine thread only."""
        with self._lock:
            if self._loop is None:
                self._sync.put(ev)
                return
            try:
                self._loop.call_soon_threadsafe(self._async.put_nowait, ev)
            except RuntimeError:  # the consumer's loop is closed: nobody will read this
                self.cancelled = True

    def __iter__(self) -> Iterator[Event]:
        """Blocking iteration until (and including) the FinishEvent."""
        while True:
            ev = self._sync.get()
            yield ev
            if isinstance(ev, FinishEvent):
                return

    async def stream(self) -> AsyncIterator[Event]:
        """Async iteration until (and including) the FinishEvent. Leaving early (client gone,
        task cancelled) cancels the request so it stops occupying a slot."""
        loop = asyncio.get_running_loop()
        aq: asyncio.Queue[Event] = asyncio.Queue()
        with self._lock:
            # Events emitted before we attached sit in the sync queue: move them over in order.
            while True:
                try:
                    aq.put_nowait(self._sync.get_nowait())
                except queue.Empty:
                    break
            self._loop, self._async = loop, aq
        finished = False
        try:
            while True:
                ev = await aq.get()
                yield ev
                if isinstance(ev, FinishEvent):
                    finished = True
                    return
        finally:
            if not finished:
                self.cancel()

    def result(self) -> tuple[str, list[TokenEvent], FinishEvent]:
        """Block until done → (full text, token events, finish event). For sync callers/tests."""
        toks: list[TokenEvent] = []
        for ev in self:
            if isinstance(ev, FinishEvent):
                return "".join(t.text for t in toks) + ev.text, toks, ev
            toks.append(ev)
        raise AssertionError("unreachable")
