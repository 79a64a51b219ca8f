"""Offline batch generation through the serving engine: the one generation path that `spud eval`,
the demo's chat eval, RL rollouts and DPO pair-making share with `spud serve`.

An engine is started for the call, every request is submitted at once (continuous batching: one
forward decodes a token for every active sequence), and the results come back in request order.
Each request carries its own seed, so a sampled completion does not depend on what it was batched
with, and greedy completions equal the server's for the same prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from spud.serve.engine_types import SamplingParams

OFFLINE_STEP_TOKENS = 4096  # prompt + decode tokens one engine step may run in complete_many


@dataclass
class Completion:
    text: str  # stop strings excluded
    ids: list[int]  # generated ids, with the end token that closed the sequence (if one did)
    finish_reason: str


def complete_many(model: torch.nn.Module, tok, prompts: list[list[int]], params: list[SamplingParams],
                  max_batch: int = 64, images: list | None = None) -> list[Completion]:
    """Completions of `prompts` (token ids) with per-prompt `params` (and, for a vision model,
    per-prompt spud.serve.prompt_images.PromptImages or None). A prompt's max_tokens is cut to the
    room its context leaves (at least 1); the model is left in the mode it was in."""
    from spud.serve.engine import Engine  # noqa: PLC0415  (engine imports the model stack)

    if len(prompts) != len(params):
        raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
    if not prompts:
        return []
    was_training = model.training
    model.eval()
    # Offline, nobody streams: a large per-step token budget lets one forward prefill many
    # prompts (copies of one prompt and prompts of equal length share it; Engine._prefill_rows)
    # instead of rationing prefill to keep running streams' latency low as the server does.
    engine = Engine(model, tok, max_batch=min(max_batch, len(prompts)), max_queue=len(prompts) + 1,
                    step_tokens=OFFLINE_STEP_TOKENS)
    engine.start()
    try:
        handles = []
        for i, (p, sp) in enumerate(zip(prompts, params)):
            room = max(1, min(sp.max_tokens, engine.max_context - len(p)))
            sp = replace(sp, max_tokens=room, incremental_text=False)  # nobody streams: decode once
            handles.append(engine.submit(p, sp, images=None if images is None else images[i]))
        out = []
        for h in handles:
            text, toks, fin = h.result()
            ids = [t.token_id for t in toks] + ([fin.end_token] if fin.end_token is not None else [])
            out.append(Completion(text, ids, fin.reason))
        return out
    finally:
        engine.shutdown()
        model.train(was_training)
