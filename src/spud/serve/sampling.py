"""Token sampling (temperature, top-k, top-p) and KV-cached generation.

Sampling draws from a private torch.Generator seeded per call, never the global RNG: the same
seed gives the same text, and sampling during training does not perturb the training RNG (which
would break bit-exact resume).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from types import SimpleNamespace

import torch

from spud.errors import SpudError
from spud.serve.engine_sampling import BatchParams, filter_rows, sample_rows


def _row_params(n: int, temperature: float, top_k: int | None, top_p: float | None,
                device: torch.device) -> BatchParams:
    """The serving engine's per-row parameters, the same for all n rows: one implementation of
    temperature / top-k / top-p serves both the engine and single-sequence generation."""
    row = SimpleNamespace(temperature=temperature, top_k=top_k or 0, top_p=top_p or 1.0, min_p=0.0,
                          presence_penalty=0.0, frequency_penalty=0.0)
    return BatchParams.build([row] * n, device)


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Mask (to -inf) everything outside the top-k and outside the top-p nucleus. logits: (B, V)."""
    return filter_rows(logits.float(), _row_params(logits.shape[0], 1.0, top_k, top_p, logits.device))


def sample_token(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits (B, V) → token ids (B,). temperature 0 = greedy. `generator` is a CPU generator
    (one uniform draw per row per token, as in the engine); None = the global RNG."""
    bp = _row_params(logits.shape[0], temperature, top_k, top_p, logits.device)
    return sample_rows(logits.float(), bp, [generator] * logits.shape[0])


def check_sampling_args(temperature: float, top_k: int | None, top_p: float | None, max_tokens: int) -> None:
    if temperature < 0:
        raise SpudError(f"--temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 0:
        raise SpudError(f"--top-k must be >= 0 (0 = off), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise SpudError(f"--top-p must be in (0, 1], got {top_p}")
    if max_tokens <= 0:
        raise SpudError(f"--max-tokens must be > 0, got {max_tokens}")


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop_ids: Sequence[int] = (),
) -> Iterator[int]:
    """Yields new token ids one at a time: one prefill over the prompt, then one cached step each.
    Stops at max_new_tokens, at a stop id (not yielded), or at the model's context length."""
    if not prompt_ids:
        raise SpudError("the prompt is empty; give at least one token")
    max_len = model.cfg.max_seq_len
    if len(prompt_ids) >= max_len:
        raise SpudError(
            f"the prompt is {len(prompt_ids)} tokens but the model's context is {max_len}; shorten it"
        )
    device = next(model.parameters()).device
    gen = torch.Generator()  # CPU: a seed means the same text on every device
    gen.manual_seed(seed if seed is not None else int(torch.randint(0, 2**31 - 1, ()).item()))
    was_training = model.training
    model.eval()
    try:
        budget = min(max_new_tokens, max_len - len(prompt_ids))
        cache = model.new_kv_cache(1, len(prompt_ids) + budget, device, next(model.parameters()).dtype)
        x = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
        stops = set(stop_ids)
        for _ in range(budget):
            logits = model(x, kv_cache=cache)[:, -1, :]
            nxt = sample_token(logits, temperature, top_k, top_p, gen)
            tok = int(nxt.item())
            if tok in stops:
                return
            yield tok
            x = nxt.view(1, 1)
    finally:
        model.train(was_training)
