"""Log-probabilities of sampled completions under a model: what RL's update (and DPO) trains on.

Two savings, neither changing what is computed (up to float rounding, tested):
- **The LM head runs on the completion positions only.** The prompt and the padding need no
  log-probabilities, and at small sizes the head and its softmax are a large part of the work.
- **Each distinct prompt goes through the trunk once** (`share_prompts`). An RL batch holds G
  completions of each prompt, and a row is prompt + completion, so most positions of a batch
  are copies of the same prompt. With `share_prompts` the rows are grouped by prompt: the
  trunk runs on the prompt alone (one row), its keys and values are recorded
  (spud.model.kv_cache.SharedPrefix), and the group's completions run on top of them, each
  only as long as its group's longest completion. The backward sums the rows' gradients into
  the one prompt, so the gradient is the batch's.
"""

from __future__ import annotations

import torch

from spud.model.kv_cache import SharedPrefix


def token_logprobs(model, seqs: torch.Tensor, targets: torch.Tensor, entropy_grad: bool = False,
                   share_prompts: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) log-probabilities of `targets` (−1 = not a completion token → 0) and the entropy of
    each position's distribution (in the graph only with `entropy_grad`, for rl.entropy_weight).
    A row's completion positions are one run after its prompt (spud.posttrain.rl._batch); with
    `share_prompts` rows whose prompts are equal share one trunk pass over it."""
    mask = targets >= 0
    # (N, d_model): the completion positions in row order
    h = completion_states(model, seqs, mask) if share_prompts else model.hidden_states(seqs)[mask]
    logp = torch.log_softmax(model.logits(h).float(), dim=-1)
    picked = logp.gather(-1, targets[mask].unsqueeze(-1)).squeeze(-1)
    d = logp if entropy_grad else logp.detach()  # detached unless rl.entropy_weight uses it
    entropy, zeros = -(d.exp() * d).sum(-1), picked.new_zeros(targets.shape)
    return zeros.masked_scatter(mask, picked), zeros.masked_scatter(mask, entropy)


def completion_batch(rows: list[tuple[list[int], list[int]]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt, completion) pairs → input ids and targets (completion positions only)."""
    width = max(len(p) + len(c) for p, c in rows) - 1
    x = torch.full((len(rows), width), pad, dtype=torch.long)
    y = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, (p, c) in enumerate(rows):
        seq = p + c
        x[i, :len(seq) - 1] = torch.tensor(seq[:-1])
        y[i, len(p) - 1:len(seq) - 1] = torch.tensor(c)
    return x, y


def completion_states(model, seqs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`model.hidden_states(seqs)[mask]`, with each distinct prompt (the tokens before a row's
    first completion position) run through the trunk once for all the rows that share it."""
    first, n = mask.int().argmax(1), mask.sum(1)
    last = mask.shape[1] - 1 - mask.flip(1).int().argmax(1)
    if not bool(((last - first + 1 == n) | (n == 0)).all()):
        raise ValueError("completion positions must be one run per row (prompt, then completion)")
    starts, lengths = first.tolist(), n.tolist()
    groups: dict[tuple, list[int]] = {}
    for i, (s, n) in enumerate(zip(starts, lengths)):
        if n:  # a row without completion tokens contributes nothing
            groups.setdefault((s, tuple(seqs[i, :s].tolist())), []).append(i)
    parts: dict[int, torch.Tensor] = {}
    for (s, _), rows in groups.items():
        width = max(lengths[i] for i in rows)
        cont = seqs[rows, s:s + width]  # the prompt's last token, then the completion
        if s == 0:  # nothing before the first completion position to share
            h = model.hidden_states(cont)
        else:
            prefix = SharedPrefix()
            model.hidden_states(seqs[rows[:1], :s], prefix)  # records the prompt's keys/values
            h = model.hidden_states(cont, prefix)
        for j, i in enumerate(rows):
            parts[i] = h[j, :lengths[i]]
    return torch.cat([parts[i] for i in sorted(parts)])
