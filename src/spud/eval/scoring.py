"""Model-facing scorers: log-likelihood of choices, greedy/sampled generation with stop strings,
and the statistics (pass@k, standard errors) the runner reports.

The log-likelihood scorers work on token ids and any module with `model(idx) -> logits (B, T, V)`
and `model.cfg.max_seq_len`, so tests can drive them with a hand-built fake model; generation goes
through the serving engine, so it needs a spud Transformer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from spud.eval import batch_scorer
from spud.serve.batch import complete_many
from spud.serve.engine_types import SamplingParams


def choice_logprobs(
    model: torch.nn.Module, context: Sequence[int], continuations: Sequence[Sequence[int]],
    pad_id: int = 0,
) -> list[float]:
    """Sum of log p(continuation tokens | context) for each continuation (one request of the
    batched scorer per continuation; see spud.eval.batch_scorer for truncation and batching).
    To score many examples, give all their pairs to `batch_scorer.score` at once."""
    pairs = [(context, c) for c in continuations]
    return [s.logprob for s in batch_scorer.score(model, pairs, pad_id=pad_id)]


def gen_params(max_new_tokens: int, stop: Sequence[str] = (), temperature: float = 0.0, seed: int = 0,
               top_p: float | None = None, top_k: int | None = None) -> SamplingParams:
    """The engine's sampling parameters for one eval completion (stop strings are cut off)."""
    return SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p or 1.0,
                          top_k=top_k or 0, seed=seed, stop=[s for s in stop if s])


def generate_texts(model: torch.nn.Module, tokenizer, prompts: Sequence[Sequence[int]],
                   params: Sequence[SamplingParams]) -> list[str]:
    """Completions of many prompts at once through the serving engine (spud.serve.batch: the same
    generation path as `spud serve`), each until a stop string (cut there), an end token, its
    token budget or the context end. Each prompt is cut from the left to leave room for its
    answer, keeping at least half the context."""
    max_len = model.cfg.max_seq_len
    cut = [list(p)[-max(max_len - sp.max_tokens, max_len // 2, 1):] for p, sp in zip(prompts, params)]
    return [c.text for c in complete_many(model, tokenizer, cut, list(params))]


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
