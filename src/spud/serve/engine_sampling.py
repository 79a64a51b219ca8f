"""Batched logit processing and sampling for the serving engine.

Every row of a decode step belongs to a different request with its own parameters, so all the
knobs are (B,) tensors and each transformation is one vectorised op over the batch. Only the
random draw is per row: each request owns a torch.Generator, and it takes exactly one uniform
number from it per generated token whatever else is in the batch. That is what makes a seeded
request give the same text alone or batched (the draw is then turned into a token by an
inverse-CDF lookup, vectorised again).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NEG_INF = float("-inf")


@dataclass
class BatchParams:
    """Per-row sampling parameters of one step, as tensors on the logits' device."""

    temperature: torch.Tensor  # (B,) float; 0 = greedy
    top_k: torch.Tensor  # (B,) long; 0 = off
    top_p: torch.Tensor  # (B,) float; 1 = off
    min_p: torch.Tensor  # (B,) float; 0 = off
    presence: torch.Tensor  # (B,) float
    frequency: torch.Tensor  # (B,) float
    any_penalty: bool
    any_top_k: bool
    any_top_p: bool
    any_min_p: bool
    all_greedy: bool
    any_greedy: bool = True  # False: every row samples (RL rollouts), so no argmax is needed

    @classmethod
    def build(cls, params: list, device: torch.device) -> BatchParams:
        """params: SamplingParams-like objects, one per row."""
        def t(vals, dtype=torch.float32):
            return torch.tensor(vals, dtype=dtype, device=device)

        temps = [float(p.temperature) for p in params]
        ks = [int(p.top_k) for p in params]
        ps = [float(p.top_p) for p in params]
        mps = [float(p.min_p) for p in params]
        pres = [float(p.presence_penalty) for p in params]
        freq = [float(p.frequency_penalty) for p in params]
        return cls(
            temperature=t(temps), top_k=t(ks, torch.long), top_p=t(ps), min_p=t(mps),
            presence=t(pres), frequency=t(freq),
            any_penalty=any(pres) or any(freq),
            any_top_k=any(k > 0 for k in ks),
            any_top_p=any(p < 1 for p in ps),
            any_min_p=any(m > 0 for m in mps),
            all_greedy=all(x <= 0 for x in temps),
            any_greedy=any(x <= 0 for x in temps),
        )


def apply_penalties(
    logits: torch.Tensor, counts: torch.Tensor | None, bias: torch.Tensor | None,
    bp: BatchParams,
) -> torch.Tensor:
    """OpenAI's definition: logit[j] -= count[j]·frequency + (count[j] > 0)·presence, counts
    over the tokens generated so far; then add logit_bias. Both skipped when no row uses them,
    so plain rows see the model's logits untouched."""
    if bp.any_penalty and counts is not None:
        logits = logits - counts * bp.frequency[:, None] - (counts > 0) * bp.presence[:, None]
    if bias is not None:
        logits = logits + bias
    return logits


def filter_rows(logits: torch.Tensor, bp: BatchParams) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p, each with its own value per row. Greedy rows
    are divided by 1 (their argmax is taken from the unscaled logits anyway)."""
    temp = torch.where(bp.temperature > 0, bp.temperature, torch.ones_like(bp.temperature))
    x = logits / temp[:, None]
    v = x.shape[-1]
    if bp.any_top_k:
        k = bp.top_k.clamp(min=0, max=v)
        kth = torch.topk(x, int(k.max()), dim=-1).values.gather(1, (k - 1).clamp(min=0)[:, None])
        x = x.masked_fill((k > 0)[:, None] & (x < kth), NEG_INF)
    if bp.any_top_p:
        sorted_x, order = torch.sort(x, descending=True, dim=-1)
        probs = sorted_x.softmax(-1)
        # Keep a token while the mass strictly before it is < top_p: the top token always stays.
        drop_sorted = (probs.cumsum(-1) - probs) >= bp.top_p[:, None]
        x = x.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), NEG_INF)
    if bp.any_min_p:
        probs = x.softmax(-1)
        floor = bp.min_p[:, None] * probs.amax(-1, keepdim=True)
        x = x.masked_fill(probs < floor, NEG_INF)
    return x


def sample_rows(
    logits: torch.Tensor, bp: BatchParams, generators: list[torch.Generator | None]
) -> torch.Tensor:
    """Processed logits (B, V) → token ids (B,). generators[i] is None for greedy rows."""
    if bp.all_greedy:
        return logits.argmax(-1)
    probs = filter_rows(logits, bp).softmax(-1)
    # One uniform per sampling row from its own generator (drawn on the CPU, so a seed means
    # the same thing on every device); greedy rows draw nothing.
    u = torch.tensor(
        [float(torch.rand((), generator=g)) if g is not None else 0.0 for g in generators],
        dtype=probs.dtype, device=probs.device,
    )
    cdf = probs.cumsum(-1)
    # right=True: the first index whose cdf exceeds u·total, never a zero-probability token.
    target = (u * cdf[:, -1])[:, None]
    idx = torch.searchsorted(cdf, target, right=True).squeeze(1).clamp(max=probs.shape[-1] - 1)
    # Float rounding can land u·total on the very end of the cdf; fall back to the mode there.
    # (An argmax over the vocabulary costs as much as the cdf at small sizes: only when needed.)
    bad = probs.gather(1, idx[:, None]).squeeze(1) <= 0
    if bool(bad.any()):
        idx = torch.where(bad, probs.argmax(-1), idx)
    if not bp.any_greedy:
        return idx
    return torch.where(bp.temperature > 0, idx, logits.argmax(-1))


def token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, want: list[int | None]
) -> tuple[list[float | None], list[list[tuple[int, float]] | None]]:
    """Log-softmax of the processed (temperature-1) logits: the chosen token's logprob and the
    top-k alternatives for rows that asked (want[i] = k, or None for no logprobs)."""
    n = len(want)
    if all(w is None for w in want):
        return [None] * n, [None] * n
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(1, tokens[:, None]).squeeze(1).tolist()
    kmax = max((w for w in want if w is not None), default=0)
    top_v = top_i = None
    if kmax > 0:
        tv, ti = torch.topk(lp, min(kmax, lp.shape[-1]), dim=-1)
        top_v, top_i = tv.tolist(), ti.tolist()
    out_lp: list[float | None] = []
    out_top: list[list[tuple[int, float]] | None] = []
    for i, w in enumerate(want):
        if w is None:
            out_lp.append(None)
            out_top.append(None)
            continue
        out_lp.append(chosen[i])
        out_top.append(list(zip(top_i[i][:w], top_v[i][:w])) if w > 0 and top_i else [])
    return out_lp, out_top
