"""Which optimizer role each parameter of a model has: the one rule that the optimizer
(train/optim.py builds its Muon and AdamW groups from it) and the memory estimate
(model/memory.py counts Muon's one state tensor against AdamW's two) share.

Muon takes the weights of nn.Linear modules inside `model.blocks` and raw ≥3-D parameters there
(stacked expert matrices); embeddings (also value embeddings inside blocks), the LM head, norms,
gains, biases and anything outside the blocks take AdamW (train/optim.py says why).
"""

from __future__ import annotations

from torch import nn


def param_roles(model: nn.Module) -> dict[str, str]:
    """Name → role for every trainable parameter (tied ones once, under their first name):
    'matrix' (Muon), 'embedding', 'head', 'other_matrix' (≥2-D outside the blocks), 'scalar'."""
    embedding = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = getattr(model, "lm_head", None)
    head_ids = {id(head.weight)} if isinstance(head, nn.Linear) else set()
    blocks = getattr(model, "blocks", None)
    block_linear: set[int] = set()
    block_params: set[int] = set()
    if isinstance(blocks, nn.Module):
        block_params = {id(p) for p in blocks.parameters()}
        block_linear = {id(m.weight) for m in blocks.modules() if isinstance(m, nn.Linear)}
    roles, seen = {}, set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in embedding:
            roles[name] = "embedding"
        elif id(p) in head_ids:
            roles[name] = "head"
        elif id(p) in block_linear or (id(p) in block_params and p.dim() >= 3):
            roles[name] = "matrix"
        elif p.dim() >= 2:
            roles[name] = "other_matrix"
        else:
            roles[name] = "scalar"
    return roles
