"""Exact parameter and FLOP accounting from a ModelConfig, in pure Python (no torch import).

Used for MFU, `spud info`, and planning runs before any tensor exists, so it must agree with the
built module exactly (tests/model/test_flops.py checks it against the module and against
torch.utils.flop_counter.FlopCounterMode).

FLOP convention ("model FLOPs", as in the PaLM MFU definition):
- A matmul of (m×k)·(k×n) costs 2·m·n·k. Only matmuls are counted; norms, activations, softmax,
  rotary, residual adds and the embedding lookup are ignored (they are O(d) per token, not O(d²)).
- Attention scores QKᵀ and the weighted sum AV are counted over the *full* T×T square per head,
  i.e. 2·2·T·head_dim·n_heads FLOPs per token per layer, even though the causal mask makes half
  of it redundant: that is what SDPA's math path computes and what FlopCounterMode reports.
  Flash kernels skip masked tiles, so on them "achieved" MFU is slightly understated, the usual
  convention. GQA/MQA do not reduce attention FLOPs (every query head attends).
- Training = 3 × forward: the backward of every matmul is two matmuls of the same size (grad of
  input, grad of weight). Flash-attention backward additionally recomputes QKᵀ; being
  rematerialisation, not model work, that is not counted.
- The LM head (2·d·V per token) is counted, tied or not; the embedding lookup is not a matmul.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from spud.errors import SpudError

if TYPE_CHECKING:
    from spud.config import ModelConfig

# RMSNorm gains (d_model each) per block, by registry block type. Every block type in
# registry.py has the same matmuls (attention + MLP); only the number of norms differs.
NORMS_PER_BLOCK: dict[str, int] = {"llama": 2, "parallel": 1}


def _vocab(cfg: ModelConfig) -> int:
    if cfg.vocab_size is None:
        raise SpudError(
            "model.vocab_size is not set; parameter/FLOP counts need it (train a tokenizer or "
            "set model.vocab_size)"
        )
    return cfg.vocab_size


def _norms_per_block(cfg: ModelConfig) -> int:
    if cfg.block not in NORMS_PER_BLOCK:
        raise SpudError(
            f"flops.py does not know block type {cfg.block!r}; add it to NORMS_PER_BLOCK in "
            f"spud/model/flops.py (known: {', '.join(NORMS_PER_BLOCK)})"
        )
    return NORMS_PER_BLOCK[cfg.block]


def _mlp_mats(cfg: ModelConfig) -> int:
    """Number of d_model×hidden weight matrices in the MLP."""
    return 3 if cfg.mlp == "swiglu" else 2


def _layer_matmul_params(cfg: ModelConfig) -> int:
    """Weights of one block's projections (each is used once per token in a matmul)."""
    d, hd = cfg.d_model, cfg.dim_head
    attn = d * (cfg.n_heads + 2 * cfg.kv_heads) * hd + cfg.n_heads * hd * d
    return attn + _mlp_mats(cfg) * d * cfg.hidden


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """{'total', 'embedding', 'non_embedding'}; equals Transformer(cfg).num_params().

    'embedding' counts every vocab×d_model matrix: the token embedding, plus the LM head when it
    is not tied (a tied head is the same tensor and is counted once).
    """
    v, d = _vocab(cfg), cfg.d_model
    embedding = v * d * (1 if cfg.tie_embeddings else 2)
    per_layer = _layer_matmul_params(cfg) + _norms_per_block(cfg) * d
    if cfg.qk_norm:
        per_layer += 2 * cfg.dim_head
    non_embedding = cfg.n_layers * per_layer + d  # + final norm
    return {
        "total": embedding + non_embedding,
        "embedding": embedding,
        "non_embedding": non_embedding,
    }


def flops_per_token(cfg: ModelConfig, seq_len: int) -> dict[str, int]:
    """Matmul FLOPs per token for sequences of seq_len: {'forward', 'training'} (see module doc).

    Per layer and token: 2·(projection weights) + 4·seq_len·head_dim·n_heads (QKᵀ and AV over the
    full square); plus 2·d_model·vocab for the LM head. Training = 3 × forward.
    """
    if seq_len <= 0:
        raise SpudError(f"seq_len must be positive, got {seq_len}")
    v = _vocab(cfg)
    per_layer = 2 * _layer_matmul_params(cfg) + 4 * seq_len * cfg.dim_head * cfg.n_heads
    forward = cfg.n_layers * per_layer + 2 * cfg.d_model * v
    return {"forward": forward, "training": 3 * forward}
