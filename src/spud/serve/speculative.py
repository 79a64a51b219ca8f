"""Speculative decoding for the serving engine: draft K tokens cheaply, check them with ONE
forward of the target model, keep the longest correct prefix plus one token of the target's own.

Drafters (each proposes up to k tokens per decoding row):
- `NgramDrafter` (prompt lookup): the continuation of the most recent earlier occurrence of the
  sequence's last n tokens (n = 3, 2, 1) in its own prompt + output. Free to compute; pays off
  when the answer copies from the context (code edits, extraction, quoting, repetitive text).
- `ModelDrafter`: a smaller model with the same tokenizer, greedy, in its own slot KV cache (the
  target's slot numbers). It catches up on the tokens the target accepted since its last draft
  (one or two, or the whole prompt for a new request) and drafts k tokens: k small forwards.

Verification: the target runs [last, d1 .. dk] for every row at its own positions in the slot
cache (rows with fewer drafts are right-padded; the causal per-row mask keeps padding invisible
to real positions). Position j's logits are exactly those plain decoding would compute after
accepting d1..dj, so:
- greedy rows keep d_{j+1} while it equals argmax at j, then emit the target's argmax at the
  first mismatch (or after the last draft): the tokens are identical to plain greedy decoding;
- sampling rows use the speculative-sampling rule: keep d with probability min(1, p_j(d)/q_j(d))
  (p = the row's temperature/top-k/top-p/min-p distribution, q = the one d was drawn from: the
  draft model's under the same settings, or the point mass on d for prompt lookup); on rejection
  draw from max(0, p_j - q_j) renormalised; after k accepted drafts draw the bonus token from
  p_k. Each emitted token is thereby distributed exactly as p (not the same draws as plain
  sampling, the same law).
Rejected positions need no KV rollback work: the sequence's length simply does not advance over
them, the per-row mask hides keys past it and the next forward overwrites them.

Not speculated (they take the plain one-token path inside the same forward): rows with
presence/frequency penalties (their logits depend on the tokens accepted within the step) and
rows with structured-output constraints (the grammar must see each token before the next mask).
"""

from __future__ import annotations

from pathlib import Path

import torch

from spud.errors import SpudError
from spud.serve.engine_sampling import BatchParams, filter_rows, token_logprobs

NGRAM_MAX, NGRAM_MIN = 3, 1
DRAFT_PREFILL_CHUNK = 256


class _RowState:
    """Per-request drafter state, kept on the engine's Seq (`s.spec`), so it dies with it."""

    __slots__ = ("draft_len", "index", "indexed", "k", "q")

    def __init__(self) -> None:
        self.draft_len = 0  # positions of this slot that the draft model's cache holds
        self.k: int | None = None  # the draft model's current draft length for this row
        self.q: list[torch.Tensor] | None = None  # the draft's distributions (sampled rows)
        self.index: dict[tuple[int, ...], int] = {}  # n-gram -> where its latest continuation starts
        self.indexed = 0  # tokens of the history already added to `index`


def _state(s) -> _RowState:
    st = getattr(s, "spec", None)
    if st is None:
        st = s.spec = _RowState()
    return st


def _history(s) -> list[int]:
    # prompt + sampled tokens; the last one (s.last) is not in the KV cache yet
    return s.prompt + s.out_ids


class NgramDrafter:
    name = "ngram"

    def __init__(self, max_ngram: int = NGRAM_MAX, min_ngram: int = NGRAM_MIN) -> None:
        self.ns = range(max_ngram, min_ngram - 1, -1)

    def propose(self, rows: list, ks: list[int]) -> list[list[int]]:
        return [self._one(s, k) if k > 0 else [] for s, k in zip(rows, ks)]

    def _one(self, s, k: int) -> list[int]:
        st, h = _state(s), _history(s)
        # Index incrementally: every n-gram ending before position i maps to i (its continuation),
        # later occurrences overwriting earlier ones; the sequence's own suffix is never indexed
        # (it has no continuation yet), so a lookup finds a genuinely earlier occurrence.
        for i in range(max(st.indexed, 1), len(h)):
            for n in self.ns:
                if i >= n:
                    st.index[tuple(h[i - n:i])] = i
        st.indexed = len(h)
        for n in self.ns:
            at = st.index.get(tuple(h[-n:])) if len(h) >= n else None
            if at is not None:
                return h[at:at + k]
        return []

    def rollback(self, s, valid: int, accepted: int, drafted: int) -> None:
        pass  # the index holds only accepted tokens; drafts cost nothing, so k stays

    def stats(self) -> dict:
        return {}


class ModelDrafter:
    """Drafts from a small model sharing the target's tokenizer (see load_draft): its argmax
    for greedy rows, a draw from its distribution for sampled rows (see _pick).

    Each drafted token costs a draft forward, so drafting adapts per row: a row's draft
    length grows by 2 after a step whose drafts were all kept and shrinks by 1 otherwise (down to
    1, the schedule of Hugging Face's assisted generation), and a draft stops early where the
    draft model's own probability of its token is below `confidence`."""

    name = "draft"
    confidence = 0.4

    def __init__(self, model, n_slots: int, max_context: int, device, vocab_limit: int,
                 k: int) -> None:
        self.model = model.to(device).eval()
        self.k = k
        self.max_len = min(max_context, model.cfg.max_seq_len)
        w = model.embed.weight
        self.cache = model.new_slot_cache(n_slots, self.max_len, w.device, w.dtype)
        self.device = w.device
        self.vocab_limit = vocab_limit  # drafts outside the target's vocabulary end the draft
        self.forwards = 0

    def propose(self, rows: list, ks: list[int]) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in rows]
        for s in rows:
            _state(s).q = None
        ks = [min(k, _state(s).k) if _state(s).k is not None else k for s, k in zip(rows, ks)]
        kmax = max(ks, default=0)
        live = [i for i, (s, k) in enumerate(zip(rows, ks))
                if k > 0 and s.length + kmax + 1 <= self.max_len]
        if not live:
            return out
        for i in live:  # a new request (or a long gap): prefill its backlog alone, in chunks
            s, st = rows[i], _state(rows[i])
            h = _history(s)
            while s.length - st.draft_len > kmax:
                n = min(DRAFT_PREFILL_CHUNK, s.length - st.draft_len)
                x = torch.tensor([h[st.draft_len:st.draft_len + n]], device=self.device)
                self.model.forward_slots(x, self.cache, [s.slot], [st.draft_len])
                self.forwards += 1
                st.draft_len += n
        # One batched forward over each row's backlog up to and including s.last (1-2 tokens
        # after the first step), right-padded, reading the logits at each row's own last token.
        feeds = [_history(rows[i])[_state(rows[i]).draft_len:] for i in live]
        t = max(len(f) for f in feeds)
        x = torch.tensor([f + [f[-1]] * (t - len(f)) for f in feeds], device=self.device)
        h = self.model.forward_slots(x, self.cache, [rows[i].slot for i in live],
                                     [_state(rows[i]).draft_len for i in live])
        self.forwards += 1
        last = torch.tensor([len(f) - 1 for f in feeds], device=self.device)
        nxt, sure = self._pick(h[torch.arange(len(live), device=self.device), last],
                               [rows[i] for i in live])
        for i, f, tok in zip(live, feeds, nxt):
            _state(rows[i]).draft_len += len(f)
            out[i].append(tok)
        for j in range(1, kmax):
            live = [i for i, ok in zip(live, sure) if ok and ks[i] > j and out[i][-1] < self.vocab_limit]
            if not live:
                break
            x = torch.tensor([[out[i][-1]] for i in live], device=self.device)
            h = self.model.forward_slots(x, self.cache, [rows[i].slot for i in live],
                                         [_state(rows[i]).draft_len for i in live])
            self.forwards += 1
            nxt, sure = self._pick(h[:, -1], [rows[i] for i in live])
            for i, tok in zip(live, nxt):
                _state(rows[i]).draft_len += 1
                out[i].append(tok)
        for i, d in enumerate(out):
            bad = [j for j, tok in enumerate(d) if tok >= self.vocab_limit]
            if bad:
                del d[bad[0]:]
        return out

    def _pick(self, h: torch.Tensor, rows: list) -> tuple[list[int], list[bool]]:
        """Draft tokens of hidden states (B, d) and whether the draft is confident enough in
        each to go on drafting after it. Greedy rows take the draft's argmax; sampled rows draw
        from the draft's distribution q under the row's own temperature/top-k/top-p/min-p (with
        the row's generator) and keep q for the acceptance test (Speculator._verify)."""
        logits = self.model.logits(h).float()
        p, tok = logits.softmax(-1).max(-1)
        toks, sure = tok.tolist(), (p >= self.confidence).tolist()
        sampled = [i for i, s in enumerate(rows) if s.params.temperature > 0]
        if sampled:
            bp = BatchParams.build([rows[i].params for i in sampled], logits.device)
            q = filter_rows(logits[sampled], bp).softmax(-1)
            v = self.vocab_limit  # the target's vocabulary: q lives on the same ids as p
            if q.shape[-1] != v:
                q = torch.nn.functional.pad(q[:, :v], (0, max(0, v - q.shape[-1])))
            for j, i in enumerate(sampled):
                st = _state(rows[i])
                toks[i] = _draw(q[j], rows[i].gen)
                sure[i] = float(q[j, toks[i]]) >= self.confidence
                st.q = (st.q or []) + [q[j]]
        return toks, sure

    def rollback(self, s, valid: int, accepted: int, drafted: int) -> None:
        st = _state(s)
        st.draft_len = min(st.draft_len, valid)
        if drafted:  # nothing drafted (a failed step): the schedule stays
            k = st.k if st.k is not None else drafted
            st.k = min(self.k, k + 2) if accepted == drafted else max(1, k - 1)

    def stats(self) -> dict:
        return {"spec_draft_forwards_total": self.forwards}


class Speculator:
    """Replaces the engine's one-token decode step (Engine._decode_step) with draft + verify."""

    def __init__(self, k: int, drafter) -> None:
        if k < 1:
            raise SpudError(f"speculate must be 0 (off) or >= 1 drafted tokens per step, got {k}")
        self.k = k
        self.drafter = drafter
        self.steps = 0
        self.drafted = 0
        self.accepted = 0
        self.emitted = 0
        self.row_steps = 0  # (row, step) pairs that verified at least one draft
        self.last_error: str | None = None  # the drafter's last failure (then plain decoding)

    def eligible(self, s) -> bool:
        p = s.params
        return p.constraint is None and not p.presence_penalty and not p.frequency_penalty

    def decode_step(self, eng) -> None:
        rows = sorted(eng._running, key=lambda s: s.slot)
        # Never draft past max_tokens (the last token is always the target's own) or the context.
        ks = [min(self.k, s.params.max_tokens - s.generated - 1, eng.max_context - s.length - 1)
              if self.eligible(s) else 0 for s in rows]
        try:
            with eng._model_lock:
                drafts = self.drafter.propose(rows, ks)
        except Exception as e:  # noqa: BLE001 - a drafter failure falls back to plain decoding
            from spud.serve.engine_seq import describe
            drafts = [[] for _ in rows]
            self.last_error = describe(e)
            for s in rows:  # whatever the drafter wrote past the kept tokens is not valid
                self.drafter.rollback(s, s.length, 0, 0)
        if not any(drafts):
            eng._decode_step()
            return
        lengths = [s.length for s in rows]
        t = min(1 + max(len(d) for d in drafts), eng.max_context - max(lengths))
        drafts = [d[:t - 1] for d in drafts]
        try:
            with eng._model_lock:
                x = torch.tensor([[s.last] + d + [s.last] * (t - 1 - len(d))
                                  for s, d in zip(rows, drafts)], device=eng.device)
                h = eng.model.forward_slots(x, eng._cache, [s.slot for s in rows], lengths)
                logits = eng.model.logits(h).float()  # (B, T, V)
            self.steps += 1
            plain = [i for i, d in enumerate(drafts) if not d]
            spec = [i for i, d in enumerate(drafts) if d]
            if plain:
                for i in plain:
                    rows[i].length += 1
                eng._sample_and_emit([rows[i] for i in plain], logits[plain, 0])
            self._verify(eng, [rows[i] for i in spec], logits[spec], [drafts[i] for i in spec])
        except Exception as e:  # noqa: BLE001 - the batch fails as a whole, the engine goes on
            from spud.serve.engine_seq import describe
            for s in rows:
                if not s.done:
                    eng._finish(s, "error", describe(e))

    def _verify(self, eng, rows: list, logits: torch.Tensor, drafts: list[list[int]]) -> None:
        b, t, v = logits.shape
        proc = logits  # (B, T, V); penalised rows are never speculated, so only the bias applies
        if any(eng._has_bias[s.slot] for s in rows):
            proc = logits + eng._bias.index_select(
                0, torch.tensor([s.slot for s in rows], device=eng.device))[:, None, :]
        greedy = proc.argmax(-1).tolist()  # (B, T)
        probs = None
        if any(s.params.temperature > 0 for s in rows):  # a row's positions share its params
            flat = BatchParams.build([s.params for s in rows for _ in range(t)], eng.device)
            probs = filter_rows(proc.reshape(b * t, v), flat).softmax(-1).reshape(b, t, v)
        for r, (s, d) in enumerate(zip(rows, drafts)):
            if s.params.temperature > 0:
                toks = _accept_sampled(probs[r], d, s.gen, _state(s).q)
            else:
                n = 0
                while n < len(d) and d[n] == greedy[r][n]:
                    n += 1
                toks = d[:n] + [greedy[r][n]]
            n_acc = len(toks) - 1
            self.drafted += len(d)
            self.row_steps += 1
            self.accepted += n_acc
            lps, tops = [None] * len(toks), [None] * len(toks)
            if s.params.logprobs is not None:
                lps, tops = token_logprobs(proc[r, :len(toks)], torch.tensor(toks, device=eng.device),
                                           [s.params.logprobs] * len(toks))
            start = s.length
            for j, (tok, lp, top) in enumerate(zip(toks, lps, tops)):
                s.length = start + j + 1
                eng._emit_token(s, tok, lp, top)
                self.emitted += 1
                if s.done:
                    break
            self.drafter.rollback(s, start + 1 + n_acc, n_acc, len(d))

    def stats(self) -> dict:
        return {
            "spec_steps_total": self.steps,
            "spec_draft_tokens_total": self.drafted,
            "spec_accepted_tokens_total": self.accepted,
            "spec_acceptance_rate": self.accepted / self.drafted if self.drafted else 0.0,
            # tokens a speculating row gains per target forward (1 = no gain, k + 1 = all kept)
            "spec_tokens_per_row_step": self.emitted / self.row_steps if self.row_steps else 0.0,
            **self.drafter.stats(),
        }


def _accept_sampled(p: torch.Tensor, draft: list[int], gen: torch.Generator,
                    q: list[torch.Tensor] | None = None) -> list[int]:
    """Speculative sampling: p (T, V) is the target's distribution at each verified position,
    q[j] the distribution draft j was drawn from (None: a deterministic proposal, q = the point
    mass on d). Keep d with probability min(1, p(d)/q(d)); on rejection draw from
    max(0, p - q) renormalised. → accepted drafts + one token drawn by the target."""
    out = []
    for j, d in enumerate(draft):
        qd = 1.0 if q is None else float(q[j][d])
        if float(torch.rand((), generator=gen)) * qd < float(p[j, d]):
            out.append(d)
            continue
        if q is None:
            residual = p[j].clone()
            residual[d] = 0  # max(0, p - q) with q the point mass on d
        else:
            residual = (p[j] - q[j]).clamp(min=0)
        if float(residual.sum()) <= 0:  # p == q up to rounding: nothing left to correct
            residual = p[j]
        return out + [_draw(residual, gen)]
    return out + [_draw(p[len(draft)], gen)]


def _draw(w: torch.Tensor, gen: torch.Generator) -> int:
    cdf = w.cumsum(-1)
    u = float(torch.rand((), generator=gen)) * float(cdf[-1])
    i = int(torch.searchsorted(cdf, torch.tensor([u], dtype=cdf.dtype, device=cdf.device),
                               right=True).clamp(max=w.shape[-1] - 1))
    return i if float(w[i]) > 0 else int(w.argmax())


def load_draft(run_dir, model: str | None, device, target_tokenizer):
    """The draft model of RUN (`model`: "base"/"chat"/None = the serving default), refused unless
    its tokenizer is byte-identical to the target's (drafted ids must mean the same tokens)."""
    from spud.runs import choose_model, default_serving_model, load_choice

    choice = choose_model(run_dir, model or default_serving_model(run_dir))
    net, tok, _cfg = load_choice(choice, str(device) if isinstance(device, torch.device) else device)
    if tok.sha256() != target_tokenizer.sha256():
        raise SpudError(
            f"--draft {run_dir}: its tokenizer ({Path(run_dir) / 'tokenizer.json'}, sha256 "
            f"{tok.sha256()[:12]}) differs from the served model's (sha256 "
            f"{target_tokenizer.sha256()[:12]}); a draft model must share the tokenizer: train it "
            "on the same run's tokenizer, or use --speculate without --draft (prompt lookup)")
    return net


def make_speculator(k: int, draft_model, *, n_slots: int, max_context: int, device,
                    vocab_size: int) -> Speculator | None:
    """None when speculation is off (k == 0)."""
    if not k:
        if draft_model is not None:
            raise SpudError("a draft model needs speculate >= 1 (tokens drafted per step)")
        return None
    drafter = (NgramDrafter() if draft_model is None
               else ModelDrafter(draft_model, n_slots, max_context, device, vocab_size, k))
    return Speculator(k, drafter)
