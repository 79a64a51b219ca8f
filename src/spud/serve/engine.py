"""Continuous-batching inference engine.

One background thread owns the model. Each iteration of its loop:
1. drops cancelled requests (their KV slot is free again immediately);
2. admits waiting requests while slots are free (a slot of the SlotKVCache each);
3. prefills: writes prompts' keys and values into their slots in chunks of at most
   `prefill_chunk` tokens, as many as the per-step token budget leaves after the decoding rows
   (chunked prefill: a 2,000-token prompt costs running streams a few chunk-sized pauses, not
   one long freeze); the step that writes a prompt's last chunk yields its first token;
4. runs ONE batched forward that decodes one token for every active sequence, whatever their
   lengths (per-row rotary positions and a per-row attention mask, see model/transformer.py).
Finished requests leave right after the step that finished them, so a short request never waits
for a long one and a freed slot is refilled at the next iteration.

Other threads (the HTTP server's event loop) only touch the waiting queue and the handles'
cancel flags, under `_cv`; model forwards run under `_model_lock`, which prompt_logprobs also
takes so it never races the decode loop. The forward steps (a prefill chunk, the batched decode,
sampling and emitting tokens) are in engine_forward.py.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import deque
from pathlib import Path

import torch

from spud.errors import SpudError
from spud.eval import batch_scorer
from spud.runtime import pick_device
from spud.serve.decode_kernel import DecodeKernel
from spud.serve.engine_forward import ForwardSteps
from spud.serve.engine_seq import Seq as _Seq
from spud.serve.engine_seq import describe as _describe
from spud.serve.engine_types import (
    ContextLengthError,
    Event,
    FinishEvent,
    QueueFullError,
    RequestHandle,
    SamplingParams,
    TokenEvent,
)
from spud.serve.prefix_cache import PrefixCache
from spud.serve.prompt_images import cache_ids
from spud.serve.speculative import load_draft, make_speculator
from spud.serve.timeouts import expire_overdue

__all__ = [
    "ContextLengthError", "Engine", "Event", "FinishEvent", "QueueFullError", "RequestHandle",
    "SamplingParams", "TokenEvent",
]


DEFAULT_PREFILL_CHUNK = 256  # tokens per prefill forward: on CPU a few ms for small models


class Engine(ForwardSteps):
    """`prefill_chunk`: most prompt tokens prefilled per forward (None: a whole prompt at once);
    `step_tokens`: per-step token budget shared by the decoding rows (one token each) and
    prefill chunks (default prefill_chunk + max_batch); a prompt always advances by at least
    one token per step, so prefill never starves. `prefix_cache_tokens` > 0 keeps up to that
    many tokens of finished requests' KV blocks (`prefix_block` tokens each) for reuse.
    `speculate` > 0 drafts that many tokens per step (prompt lookup, or `draft_model`: a smaller
    model with the same tokenizer) and verifies them in one forward (serve/speculative.py);
    `request_timeout` ends requests older than that many seconds (serve/timeouts.py).
    `decode_kernel`: decode steps through serve/decode_kernel.py where it supports the model
    (a CPU llama-block model; else, or when False, the model's own forward)."""

    def __init__(self, model, tokenizer, *, max_batch: int = 32, max_queue: int = 256,
                 max_context: int | None = None, device=None, model_name: str = "spud",
                 prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK, step_tokens: int | None = None,
                 prefix_cache_tokens: int = 0, prefix_block: int = 16, speculate: int = 0,
                 draft_model=None, request_timeout: float | None = None,
                 decode_kernel: bool = True) -> None:
        if max_batch < 1 or max_queue < 0:
            raise SpudError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch}, {max_queue}")
        if prefill_chunk is not None and prefill_chunk < 1:
            raise SpudError(f"prefill_chunk must be >= 1 (or None for whole prompts), got {prefill_chunk}")
        if step_tokens is not None and step_tokens < 1:
            raise SpudError(f"step_tokens must be >= 1, got {step_tokens}")
        if prefix_cache_tokens and not (prefix_block >= 1 and prefix_cache_tokens >= prefix_block):
            raise SpudError(f"prefix_cache_tokens ({prefix_cache_tokens}) must be 0 (off) or at least "
                            f"one block of prefix_block={prefix_block} tokens")
        self.prefill_chunk = prefill_chunk
        # reuse of earlier requests' prompt/turn KV blocks (spud.serve.prefix_cache); 0 = off
        self._prefix = PrefixCache(prefix_block, prefix_cache_tokens) if prefix_cache_tokens > 0 else None
        self.step_tokens = step_tokens or ((prefill_chunk or 0) + max_batch)
        if request_timeout is not None and not request_timeout > 0:
            raise SpudError(f"request_timeout must be > 0 seconds (or None), got {request_timeout}")
        self.request_timeout = request_timeout  # seconds from submit; see serve/timeouts.py
        limit = model.cfg.max_seq_len
        if max_context is not None and not 1 < max_context <= limit:
            raise SpudError(f"max_context={max_context} must be in [2, model.max_seq_len={limit}]")
        if device is not None:
            model = model.to(pick_device(device) if isinstance(device, str) else device)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_name = model_name
        # which model of a run and which checkpoint (set by from_run; None for a bare model)
        self.model_kind: str | None = None
        self.checkpoint: str | None = None
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_context = max_context or limit
        w = model.embed.weight
        self.device = w.device
        self.vocab_size = model.cfg.vocab_size
        self.end_ids = {i for i in (tokenizer.end_id, tokenizer.eos_id, tokenizer.bos_id)
                        if i is not None}
        self._cache = model.new_slot_cache(max_batch, self.max_context, self.device, w.dtype)
        self._kernel = DecodeKernel.of(model) if decode_kernel else None
        # speculative decoding (spud.serve.speculative): None = plain one-token decode steps
        self._spec = make_speculator(speculate, draft_model, n_slots=max_batch,
                                     max_context=self.max_context, device=self.device,
                                     vocab_size=self.vocab_size)
        # Per-slot generated-token counts (penalties) and dense logit biases, reset on admit.
        self._counts = torch.zeros(max_batch, self.vocab_size, device=self.device)
        self._bias = torch.zeros(max_batch, self.vocab_size, device=self.device)
        self._has_bias = [False] * max_batch
        # _sample_and_emit's per-batch tensors, kept while the batch's members stay the same
        self._batch_key: tuple | None = None
        self._batch: tuple | None = None
        self._free = list(range(max_batch))  # min-heap: low slots first keeps rows contiguous
        self._running: list[_Seq] = []  # decoding
        self._prefilling: deque[_Seq] = deque()  # holding a slot, prompt not fully written yet
        self._waiting: deque[_Seq] = deque()
        self._cv = threading.Condition()
        self._model_lock = threading.RLock()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._ids = itertools.count(1)
        self._stats = {"requests_total": 0, "prompt_tokens_total": 0,
                       "completion_tokens_total": 0, "cancelled_total": 0}

    @classmethod
    def from_run(cls, run_dir, checkpoint=None, device="auto", model: str | None = None, **limits) -> Engine:
        """`model`: "base" or "chat" (see spud.runs.MODEL_DIRS); None = the chat model when RUN
        has one, else the base model. The choice is kept on the engine (`model_kind`,
        `checkpoint`) and is part of the served model id, e.g. "demo-chat"."""
        from spud.runs import choose_model, default_serving_model, load_choice

        choice = choose_model(run_dir, model or default_serving_model(run_dir), checkpoint)
        net, tok, _cfg = load_choice(choice, device)
        draft_run, draft_kind = limits.pop("draft", None), limits.pop("draft_model_kind", None)
        if draft_run is not None:  # refused here, at start-up, if the tokenizers differ
            limits["draft_model"] = load_draft(draft_run, draft_kind, device, tok)
        limits.setdefault("model_name", f"{Path(run_dir).resolve().name}-{choice.model}")
        engine = cls(net, tok, **limits)
        engine.model_kind, engine.checkpoint = choice.model, str(choice.checkpoint)
        return engine

    # ------------------------------------------------------------------------ caller's side
    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name="spud-engine", daemon=True)
        self._thread.start()

    def shutdown(self, abort: bool = False) -> None:
        """Finish in-flight and queued requests (or cancel them all when abort), then join."""
        with self._cv:
            self._stopping = True
            if abort:
                for s in [*self._waiting, *self._prefilling, *self._running]:
                    s.handle.cancelled = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join()
        else:  # never started: nothing will serve the queue
            while self._waiting:
                self._finish(self._waiting.popleft(), "cancelled")
        # The last batch's sequences hold bound methods of this engine (their detokenizer, their
        # handle's wake-up): a reference cycle that kept each finished engine, KV cache included,
        # alive until the next full garbage collection — `spud rl`, which makes engines for every
        # rollout round, grew to 3 GB that way. A stopped engine serves nothing more.
        self._batch_key = self._batch = None

    def submit(self, prompt_ids: list[int], params: SamplingParams, images=None) -> RequestHandle:
        """`images`: a spud.serve.prompt_images.PromptImages for a prompt with image placeholders
        (one object may be shared by the n choices of a request: it encodes its images once)."""
        prompt = [int(i) for i in prompt_ids]
        if not prompt:
            raise SpudError("the prompt is empty; give at least one token")
        if min(prompt) < 0 or max(prompt) >= self.vocab_size:
            raise SpudError(f"prompt token ids must be in [0, {self.vocab_size})")
        params.validate(self.vocab_size)
        self._check_context(len(prompt), params.max_tokens)
        if images is not None:
            images.check(prompt)
        with self._cv:
            if self._stopping:
                raise SpudError("the engine is shutting down; not accepting requests")
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(
                    f"{len(self._waiting)} requests are already waiting (max_queue="
                    f"{self.max_queue}); retry later"
                )
            handle = RequestHandle(f"req-{next(self._ids)}", len(prompt), self._wake)
            ends = set() if params.ignore_eos else set(self.end_ids)
            ends |= {int(i) for i in params.stop_token_ids}
            seq = _Seq(handle, prompt, params, ends, self._decode)
            seq.images = images
            self._waiting.append(seq)
            self._stats["requests_total"] += 1
            self._stats["prompt_tokens_total"] += len(prompt)
            self._cv.notify_all()
        return handle

    def prompt_logprobs(self, prompt_ids: list[int], top_n: int = 0
                        ) -> list[tuple[float | None, list[tuple[int, float]]]]:
        """Per prompt position i: logprob of token i given tokens < i (None for the first)
        and the top_n alternatives there (empty for the first)."""
        return self.prompt_logprobs_many([prompt_ids], top_n)[0]

    def prompt_logprobs_many(self, prompts: list[list[int]], top_n: int = 0
                             ) -> list[list[tuple[float | None, list[tuple[int, float]]]]]:
        """prompt_logprobs for several prompts, scored together by the batched scorer
        (spud.eval.batch_scorer, the one `spud eval` uses)."""
        prompts = [[int(i) for i in p] for p in prompts]
        for p in prompts:
            self._check_context(len(p), 0)
        with self._model_lock, torch.inference_mode():
            scores = batch_scorer.score(self.model, [(p[:1], p[1:]) for p in prompts],
                                        pad_id=self.tokenizer.pad_id, per_token=True, top_n=top_n)
        out = []
        for p, s in zip(prompts, scores):
            tops = s.top if s.top is not None else [[] for _ in s.token_logprobs]
            out.append(([(None, [])] if p else []) + list(zip(s.token_logprobs, tops)))
        return out

    def stats(self) -> dict:
        with self._cv:
            out = {"running": len(self._running) + len(self._prefilling), "waiting": len(self._waiting),
                   **self._stats}
        out["decode_kernel"] = int(self._kernel is not None)  # 1: decode steps via serve/decode_kernel.py
        if self._prefix is not None:
            out |= self._prefix.stats()
        if self._spec is not None:
            out |= self._spec.stats()
        return out

    # ----------------------------------------------------------------------- engine thread
    def _check_context(self, n_prompt: int, max_tokens: int) -> None:
        if n_prompt + max_tokens > self.max_context:
            raise ContextLengthError(
                f"this model's maximum context length is {self.max_context} tokens, but "
                f"{n_prompt + max_tokens} were requested ({n_prompt} in the prompt + "
                f"{max_tokens} max_tokens); shorten the prompt or lower max_tokens"
            )

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special=True)

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify_all()

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not (self._waiting or self._running or self._prefilling or self._stopping):
                        self._cv.wait()
                    if self._stopping and not (self._waiting or self._running or self._prefilling):
                        return
                try:
                    self._step()
                except Exception as e:  # noqa: BLE001 - last resort: the thread must not die
                    for s in [*self._prefilling, *self._running]:
                        self._finish(s, "error", _describe(e))

    def _step(self) -> None:
        if self.request_timeout is not None:
            expire_overdue(self)
        for s in [s for s in [*self._prefilling, *self._running] if s.handle.cancelled]:
            self._finish(s, "cancelled")
        while self._free:
            with self._cv:
                if not self._waiting:
                    break
                s = self._waiting.popleft()
            if s.handle.cancelled:
                self._finish(s, "cancelled")
                continue
            self._admit(s)
        budget = self.step_tokens - len(self._running)
        while self._prefilling:
            s = self._prefilling[0]
            left = len(s.prompt) - s.prefilled
            n = left if self.prefill_chunk is None else max(1, min(self.prefill_chunk, left, budget))
            budget -= n * self._prefill(self._prefill_rows(s, n, budget), n)
            if self.prefill_chunk is not None and budget <= 0:
                break
        if self._running:
            if self._spec is not None:
                self._spec.decode_step(self)
            else:
                self._decode_step()

    def _admit(self, s: _Seq) -> None:
        s.slot = heapq.heappop(self._free)
        s.handle.admitted = time.perf_counter()
        with self._cv:
            self._prefilling.append(s)
        try:
            if self._prefix is not None:  # start the prefill after the cached shared prefix
                with self._model_lock:
                    s.prefilled = self._prefix.load(cache_ids(s, s.prompt), self._cache, s.slot)
            if s.images is not None:  # the image encoder runs once per request, here
                with self._model_lock:
                    s.images.embeds(self.model)
            self._counts[s.slot].zero_()
            bias = s.params.logit_bias or {}
            self._has_bias[s.slot] = bool(bias)
            if bias:
                self._bias[s.slot].zero_()
                idx = torch.tensor([int(k) for k in bias], device=self.device)
                self._bias[s.slot, idx] = torch.tensor(
                    [float(v) for v in bias.values()], device=self.device)
        except Exception as e:  # noqa: BLE001 - any failure ends this request, not the engine
            self._finish(s, "error", _describe(e))

    def _finish(self, s: _Seq, reason: str, error: str | None = None) -> None:
        if s.done:
            return
        s.done = True
        text = ""
        if reason != "error":
            try:
                text = s.detok.flush()
            except Exception as e:  # noqa: BLE001 - a decode failure must not keep the slot
                reason, error = "error", _describe(e)
            if s.detok.stopped and reason == "length":
                reason = "stop"  # a stop string completed only by the final flush
        with self._cv:
            if s in self._running:
                self._running.remove(s)
            if s in self._prefilling:
                self._prefilling.remove(s)
            if reason == "cancelled":
                self._stats["cancelled_total"] += 1
        if s.slot >= 0:
            if self._prefix is not None and reason != "error":
                # positions [0, length) hold prompt + sampled tokens (the last sampled one is
                # never fed back); a request cut short in prefill has its written prefix
                valid = s.length if s.length else s.prefilled
                try:
                    with self._model_lock:
                        self._prefix.store(cache_ids(s, (s.prompt + s.out_ids)[:valid]),
                                           self._cache, s.slot)
                except Exception:  # noqa: BLE001 - a cache failure must never keep the slot
                    pass
            heapq.heappush(self._free, s.slot)
            s.slot = -1
        s.handle._emit(FinishEvent(reason, text, len(s.prompt), s.generated, error, s.end_token))

