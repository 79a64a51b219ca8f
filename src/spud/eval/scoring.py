"""Model-facing scorers: log-likelihood of choices, greedy/sampled generation with stop strings,
and the statistics (pass@k, standard errors) the runner reports.

These work on token ids and any module with `model(idx) -> logits (B, T, V)` and
`model.cfg.max_seq_len`, so tests can drive them with a hand-built fake model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from spud.eval import batch_scorer
from spud.serve.sampling import generate


def choice_logprobs(
    model: torch.nn.Module, context: Sequence[int], continuations: Sequence[Sequence[int]],
    pad_id: int = 0,
) -> list[float]:
    """Sum of log p(continuation tokens | context) for each continuation (one request of the
    batched scorer per continuation; see spud.eval.batch_scorer for truncation and batching).
    To score many examples, give all their pairs to `batch_scorer.score` at once."""
    pairs = [(context, c) for c in continuations]
    return [s.logprob for s in batch_scorer.score(model, pairs, pad_id=pad_id)]


def generate_text(
    model: torch.nn.Module, tokenizer, prompt_ids: Sequence[int], max_new_tokens: int,
    stop: Sequence[str] = (), temperature: float = 0.0, seed: int = 0,
    top_p: float | None = None,
) -> str:
    """Decode until a stop string appears (cut there), a special end token, the token budget or
    the context end. The prompt is cut from the left to leave room for the answer."""
    max_len = model.cfg.max_seq_len
    keep = max(max_len - max_new_tokens, max_len // 2, 1)
    ids = list(prompt_ids)[-keep:]
    stop_ids = [tokenizer.end_id, tokenizer.eos_id, tokenizer.bos_id]
    out: list[int] = []
    text = ""
    for tok in generate(model, ids, max_new_tokens, temperature=temperature, top_p=top_p,
                        seed=seed, stop_ids=stop_ids):
        out.append(tok)
        text = tokenizer.decode(out)
        cut = _first_stop(text, stop)
        if cut is not None:
            return text[:cut]
    return text


def _first_stop(text: str, stop: Sequence[str]) -> int | None:
    hits = [text.find(s) for s in stop if s and s in text]
    return min(hits) if hits else None


# --------------------------------------------------------------------------------- statistics
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c passed (Chen et al. 2021):
    1 - C(n-c, k) / C(n, k), computed as a stable product instead of huge binomials."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def binomial_stderr(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n) if n > 0 else float("nan")


def bootstrap_stderr(values: Sequence[float], seed: int = 0, rounds: int = 1000) -> float:
    """Standard error of the mean by resampling examples (for non-0/1 scores like pass@k)."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        return float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(rounds, len(v)))].mean(axis=1)
    return float(means.std(ddof=1))


def centered(acc: float, baseline: float) -> float:
    """Accuracy rescaled so chance is 0 and perfect is 1 (DCLM's CORE centring)."""
    return (acc - baseline) / (1.0 - baseline) if baseline < 1 else float("nan")
