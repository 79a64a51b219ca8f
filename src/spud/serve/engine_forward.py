"""The model-running half of Engine: prefill chunks, the batched decode step, sampling, emitting."""

from __future__ import annotations

import torch

from spud.errors import SpudError
from spud.serve.engine_sampling import (
    BatchParams,
    apply_penalties,
    sample_rows,
    token_logprobs,
)
from spud.serve.engine_seq import Seq as _Seq
from spud.serve.engine_seq import describe as _describe
from spud.serve.engine_types import TokenEvent
from spud.serve.prompt_images import chunk_inputs
from spud.serve.structured import apply_constraints


class ForwardSteps:
    """Mixed into Engine (engine.py), whose state these methods use: the model, its slot cache
    and `_model_lock`, the per-slot penalty/bias tensors, the prefilling/running lists under
    `_cv`, and `_finish`. speculative.py calls `_decode_step`, `_sample_and_emit` and
    `_emit_token` too."""

    def _prefill_rows(self, s: _Seq, n: int, budget: int) -> list[_Seq]:
        """s and the other prefilling sequences whose next chunk is also n tokens: one forward
        writes them all. Prompts of equal length share it as many as the step's token budget
        holds; copies of a prompt already in (RL groups, pass@k samples) ride along free, as
        `_prefill` computes each distinct prompt once. Prompts with images go alone (their
        embeddings are per sequence)."""
        rows = [s]
        if s.images is not None:
            return rows
        cap = self.prefill_chunk if self.prefill_chunk is not None else len(s.prompt) + 1  # None: whole prompts
        room = len(self._prefilling) if self.prefill_chunk is None else budget // n
        distinct = {_prefill_key(s)}
        for t in list(self._prefilling)[1:]:
            if t.images is not None or min(cap, len(t.prompt) - t.prefilled) != n:
                continue
            key = _prefill_key(t)
            if key not in distinct:
                if len(distinct) >= room:
                    continue
                distinct.add(key)
            rows.append(t)
        return rows

    def _prefill(self, rows: list[_Seq], n: int) -> int:
        """Write the next n prompt tokens of each row into its slot; each row whose prompt this
        completes samples its first token and joins the decoding rows. Copies of one prompt at
        the same point (an RL group, pass@k samples) have the same keys, values and last logits:
        the forward runs on one of them and the others' slots get a copy of its new positions.
        → the number of rows the forward ran on (what the step's token budget pays for)."""
        first: dict[tuple, int] = {}  # a row's prefill key → index of the row that computes it
        src = [first.setdefault(_prefill_key(t), len(first)) for t in rows]
        uniq = [rows[src.index(j)] for j in range(len(first))]
        try:
            s = rows[0]
            with self._model_lock:
                x = torch.tensor([t.prompt[t.prefilled:t.prefilled + n] for t in uniq], device=self.device)
                h = self.model.forward_slots(x, self._cache, [t.slot for t in uniq], [t.prefilled for t in uniq],
                                             **chunk_inputs(s, self.model, s.prefilled, n))
                copies = [(uniq[j].slot, t.slot, t.prefilled) for j, t in zip(src, rows) if t is not uniq[j]]
                if copies:
                    from_slots, to_slots, starts = map(list, zip(*copies))
                    self._cache.copy_positions(from_slots, to_slots, starts, n)
                done = [i for i, t in enumerate(rows) if t.prefilled + n == len(t.prompt)]
                logits = self.model.logits(h[[src[i] for i in done], -1]).float() if done else None
            for t in rows:
                t.prefilled += n
            finished = [rows[i] for i in done]
            if finished:
                with self._cv:
                    for t in finished:
                        self._prefilling.remove(t)
                        self._running.append(t)
                for t in finished:
                    t.length = len(t.prompt)
                self._sample_and_emit(finished, logits)
        except Exception as e:  # noqa: BLE001 - any failure ends these requests, not the engine
            for t in rows:
                if not t.done:
                    self._finish(t, "error", _describe(e))
        return len(uniq)

    def _decode_step(self) -> None:
        rows = sorted(self._running, key=lambda s: s.slot)
        try:
            with self._model_lock:
                # a flat list converts several times faster than a nested one
                x = torch.tensor([s.last for s in rows], device=self.device)
                slots, starts = [s.slot for s in rows], [s.length for s in rows]
                if self._kernel is not None:  # the lean CPU step (serve/decode_kernel.py)
                    logits = self._kernel.logits(x, self._cache, slots, starts).float()
                else:
                    h = self.model.forward_slots(x.view(-1, 1), self._cache, slots, starts)
                    logits = self.model.logits(h[:, -1]).float()
            for s in rows:
                s.length += 1
            self._sample_and_emit(rows, logits)
        except Exception as e:  # noqa: BLE001 - the batch fails as a whole, the engine goes on
            for s in rows:
                if not s.done:
                    self._finish(s, "error", _describe(e))

    def _sample_and_emit(self, rows: list[_Seq], logits: torch.Tensor) -> None:
        """Penalties/bias → sample → logprobs for all rows at once, then per-row bookkeeping."""
        # The batch's parameter tensors only change when its membership does (a request's
        # params and slot are fixed while it runs), so consecutive decode steps reuse them.
        # The key holds the _Seq objects themselves (compared by identity), never bare id()s
        # that a finished request could hand down to a new one.
        key = tuple(rows)
        if self._batch_key != key:
            bp = BatchParams.build([s.params for s in rows], self.device)
            slots = torch.tensor([s.slot for s in rows], device=self.device)
            has_bias = any(self._has_bias[s.slot] for s in rows)
            constrained = any(s.params.constraint is not None for s in rows)
            self._batch_key, self._batch = key, (bp, slots, has_bias, constrained)
        bp, slots, has_bias, constrained = self._batch
        counts = self._counts.index_select(0, slots) if bp.any_penalty else None
        bias = self._bias.index_select(0, slots) if has_bias else None
        proc = apply_penalties(logits, counts, bias, bp)
        if constrained:  # structured output: what the grammar forbids is -inf before sampling
            proc = apply_constraints(proc, [s.params.constraint for s in rows])
        toks = sample_rows(proc, bp, [s.gen for s in rows])
        if bp.any_penalty:
            # Counts are only ever read for rows with penalties (and reset on admit), so a batch
            # without any skips the update.
            self._counts.index_put_((slots, toks), torch.ones_like(toks, dtype=torch.float32),
                                    accumulate=True)
        lps, tops = token_logprobs(proc, toks, [s.params.logprobs for s in rows])
        for s, tok, lp, top in zip(rows, toks.tolist(), lps, tops):
            self._emit_token(s, tok, lp, top)

    def _emit_token(self, s: _Seq, tok: int, lp, top) -> None:
        s.generated += 1
        s.last = tok
        s.out_ids.append(tok)
        with self._cv:
            self._stats["completion_tokens_total"] += 1
        if tok in s.end_ids:
            # The end token itself is not part of the output (no TokenEvent), only counted;
            # the finish event names it (RL trains on the exact sequence that was sampled).
            s.end_token = tok
            self._finish(s, "stop")
            return
        if s.params.constraint is not None:
            try:  # advance the grammar; only this request fails if it cannot
                s.params.constraint.consume(tok)
            except SpudError as e:
                self._finish(s, "error", str(e))
                return
        s.handle._emit(TokenEvent(tok, s.detok.push(tok), lp, top))
        if s.detok.stopped:
            self._finish(s, "stop")
        elif s.generated >= s.params.max_tokens or s.length >= self.max_context:
            self._finish(s, "length")


def _prefill_key(s: _Seq) -> tuple:
    """Rows with equal keys get equal keys and values from their next chunk: the same prompt,
    prefilled to the same point (and no images, which _prefill_rows never groups)."""
    return s.prefilled, s.prompt_tuple
