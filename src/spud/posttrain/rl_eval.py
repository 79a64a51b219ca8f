"""Generation and held-out scoring for `spud rl` (and `spud dpo`, benchmarks/rl_gain.py): every
completion goes through the serving engine's batched generation (spud.serve.batch), the one
generation path of serve, eval and RL."""

from __future__ import annotations

from spud.posttrain.rl_sampling import seed_of
from spud.posttrain.rl_tasks import Problem
from spud.posttrain.verifiers import verify
from spud.tokenizer import Tokenizer


def generate_many(model, tok: Tokenizer, prompts: list[list[int]], max_tokens: int, temperature: float,
                  seeds: list[int] | None = None) -> list[tuple[list[int], str]]:
    """Completions of many prompts through the serving engine (spud.serve.batch): → (completion
    ids including the end token that closed it, text) per prompt."""
    from spud.serve.batch import complete_many  # noqa: PLC0415
    from spud.serve.engine import SamplingParams  # noqa: PLC0415

    params = [SamplingParams(max_tokens=max_tokens, temperature=temperature,
                             seed=None if seeds is None else seeds[i]) for i in range(len(prompts))]
    return [(c.ids, c.text) for c in complete_many(model, tok, prompts, params)]


def prompt_ids(tok: Tokenizer, p: Problem, limit: int) -> list[int]:
    ids, _ = tok.render_chat(p.messages, add_generation_prompt=True)
    return ids[-limit:]


def evaluate(model, tok: Tokenizer, problems: list[Problem], samples: int = 1, temperature: float = 0.0,
             max_tokens: int = 64, seed: int = 0, timeout: float = 5.0, split_map=None,
             completions: list | None = None) -> dict:
    """Held-out pass@k: greedy pass@1 when samples == 1, else unbiased pass@k for k ≤ samples.
    `split_map` (RLDist.map) splits the generation across data-parallel ranks; `completions`, when
    given, receives each problem's (texts, number correct) for a closer look."""
    from spud.eval.scoring import pass_at_k  # noqa: PLC0415

    if not problems:
        return {"n": 0}
    limit = model.cfg.max_seq_len - max_tokens
    prompts = [prompt_ids(tok, p, limit) for p in problems for _ in range(samples)]
    seeds = [seed_of(seed, "eval", i) for i in range(len(prompts))] if temperature > 0 else None

    def gen(idx: list[int]) -> list:
        return generate_many(model, tok, [prompts[i] for i in idx], max_tokens, temperature,
                             None if seeds is None else [seeds[i] for i in idx])

    outs = (split_map or (lambda f, xs: f(list(xs))))(gen, range(len(prompts)))
    correct = []
    for i, p in enumerate(problems):
        texts = [outs[i * samples + j][1] for j in range(samples)]
        correct.append(sum(verify(p.verifier, t, p.reference, p.tests, timeout).correct for t in texts))
        if completions is not None:
            completions.append((texts, correct[-1]))
    ks = [k for k in (1, 2, 4, 8, 16, 32) if k <= samples]
    return {"n": len(problems), "samples": samples, "temperature": temperature,
            **{f"pass@{k}": sum(pass_at_k(samples, c, k) for c in correct) / len(problems) for k in ks}}
