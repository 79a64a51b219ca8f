"""The one batched scorer: log-likelihood of continuations given contexts, for native eval tasks,
the lm-eval adapter (`loglikelihood`, `loglikelihood_rolling`) and `/v1/completions` with
echo + logprobs (Engine.prompt_logprobs).

A request is a (context ids, continuation ids) pair. Conventions (the same for every caller):
- a context + continuation longer than the model's context is cut from the LEFT, keeping the
  last max_seq_len + 1 tokens (the final token is only a target, never an input), so the
  continuation is kept whole when it fits and otherwise its tail is scored;
- an empty context conditions on nothing: the continuation's first token is not scored.

How it is fast: requests are sorted longest first and packed into right-padded batches whose
rows x width stays under `token_budget` (causal attention never looks right, so padding cannot
change a real position); the LM head runs only on the positions that predict a continuation
token, not on the whole (rows, width, vocab) block; results come back in request order.
Scores equal one-request-per-forward scoring up to float rounding (tests/eval/test_batch_scorer.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

DEFAULT_TOKEN_BUDGET = 8192  # rows x padded width per forward: large enough to fill a CPU/GPU step


@dataclass
class Score:
    logprob: float  # sum over the scored continuation tokens
    greedy: bool  # every scored token was the argmax
    token_logprobs: list[float] | None = None  # per scored token, when asked
    top: list[list[tuple[int, float]]] | None = None  # top-n (id, logprob) per scored token


def _device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _row(ctx: Sequence[int], cont: Sequence[int], max_len: int) -> tuple[list[int], list[int]] | None:
    """→ (input ids, target ids scored at the last len(targets) input positions), or None when
    nothing is scored."""
    seq = (list(ctx) + list(cont))[-(max_len + 1):]
    n = min(len(cont), len(seq) - 1)
    if n <= 0:
        return None
    return seq[:-1], seq[len(seq) - n:]


def pack(lengths: Sequence[int], token_budget: int, max_rows: int | None = None) -> list[list[int]]:
    """Indices grouped into batches, longest first, each with rows x longest length <= budget
    (a single row longer than the budget gets a batch of its own)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        b = batches[-1] if batches else None
        if b is not None and (len(b) + 1) * lengths[b[0]] <= token_budget and \
                (max_rows is None or len(b) < max_rows):
            b.append(i)
        else:
            batches.append([i])
    return batches


def _head(model: torch.nn.Module, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Logits at (rows[k], cols[k]) only. Spud's Transformer exposes hidden_states/logits, so the
    vocabulary projection skips context positions; any other `model(x) -> logits` works too."""
    if hasattr(model, "hidden_states") and hasattr(model, "logits"):
        return model.logits(model.hidden_states(x)[rows, cols])
    return model(x)[rows, cols]


@torch.no_grad()
def score(
    model: torch.nn.Module, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *,
    pad_id: int = 0, token_budget: int = DEFAULT_TOKEN_BUDGET, max_rows: int | None = None,
    per_token: bool = False, top_n: int = 0,
) -> list[Score]:
    """Score every (context, continuation) pair; → one Score per pair, in the given order.
    `per_token` also returns each scored token's log-prob, `top_n` the n most likely tokens
    at each scored position."""
    if token_budget < 1:
        raise ValueError(f"token_budget must be >= 1, got {token_budget}")
    max_len = int(model.cfg.max_seq_len)
    rows = [_row(c, t, max_len) for c, t in pairs]
    out: list[Score | None] = [None] * len(pairs)
    live = [i for i, r in enumerate(rows) if r is not None]
    for i, r in enumerate(rows):
        if r is None:
            out[i] = Score(0.0, True, [] if per_token else None, [] if top_n > 0 else None)
    dev = _device(model)
    for batch in pack([len(rows[i][0]) for i in live], token_budget, max_rows):
        idx = [live[j] for j in batch]
        width = len(rows[idx[0]][0])
        x = torch.full((len(idx), width), pad_id, dtype=torch.long)
        r_at, c_at, tgt, spans = [], [], [], []
        for b, i in enumerate(idx):
            inp, t = rows[i]
            x[b, :len(inp)] = torch.tensor(inp, dtype=torch.long)
            start = len(inp) - len(t)  # logits at position p predict token p + 1
            r_at += [b] * len(t)
            c_at += range(start, len(inp))
            spans.append((len(tgt), len(tgt) + len(t)))
            tgt += t
        logits = _head(model, x.to(dev), torch.tensor(r_at, device=dev), torch.tensor(c_at, device=dev))
        logp = torch.log_softmax(logits.float(), dim=-1)  # (scored tokens, vocab)
        t = torch.tensor(tgt, dtype=torch.long, device=dev)
        chosen = logp.gather(1, t[:, None]).squeeze(1)
        hit = (logp.argmax(-1) == t).tolist()
        chosen_l = chosen.tolist()
        tops = None
        if top_n > 0:
            tv, ti = torch.topk(logp, min(top_n, logp.shape[-1]), dim=-1)
            tops = [list(zip(a, v)) for a, v in zip(ti.tolist(), tv.tolist())]
        for i, (a, b) in zip(idx, spans):
            out[i] = Score(sum(chosen_l[a:b]), all(hit[a:b]),
                           chosen_l[a:b] if per_token else None, tops[a:b] if tops is not None else None)
    return out  # type: ignore[return-value]


def rolling_pairs(ids: Sequence[int], prefix: int, max_len: int) -> list[tuple[list[int], list[int]]]:
    """A whole text as disjoint windows of max_len predicted tokens: the first conditioned on
    `prefix` (BOS), each later one on the max_len tokens before its last target (lm-eval's
    disjoint rolling windows with context_len=1). Summing their scores gives the text's
    log-likelihood; the windows of many texts can go into one `score` call."""
    ids = list(ids)
    out = []
    for s in range(0, len(ids), max_len):
        e = min(s + max_len, len(ids))
        ctx = [prefix] if s == 0 else ids[max(0, e - max_len - 1):s]
        out.append((ctx, ids[s:e]))
    return out


def score_rolling(model: torch.nn.Module, texts: Sequence[Sequence[int]], prefix: int, *,
                  pad_id: int = 0, token_budget: int = DEFAULT_TOKEN_BUDGET,
                  max_rows: int | None = None) -> list[float]:
    """Log-likelihood of each whole token sequence (rolling windows), all windows of all texts
    batched together; → one float per text, in order (0.0 for an empty text)."""
    max_len = int(model.cfg.max_seq_len)
    pairs, owner = [], []
    for k, ids in enumerate(texts):
        for p in rolling_pairs(ids, prefix, max_len):
            pairs.append(p)
            owner.append(k)
    totals = [0.0] * len(texts)
    for k, s in zip(owner, score(model, pairs, pad_id=pad_id, token_budget=token_budget,
                                 max_rows=max_rows)):
        totals[k] += s.logprob
    return totals
