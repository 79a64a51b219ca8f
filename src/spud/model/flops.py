"""Exact parameter and FLOP counts of a ModelConfig, read from the module itself.

Nothing here knows any architecture: the model the config describes is built on the meta device
(shapes, no memory, no arithmetic, no initialisation), then
- its parameters are counted;
- its FLOPs are summed over its modules (`module_flops`): Linears by their shape, and modules
  whose cost is not one matmul per token (attention, mixture of experts, multi-token heads)
  by their own `flops_per_token(seq_len)`.
So a new block, MLP or option is counted with no table to edit, and tests/model check every
option against torch's FlopCounterMode on real forward and backward passes. Meta models are
cached per config; a count takes milliseconds.

FLOP convention ("model FLOPs", as in the PaLM MFU definition):
- A matmul of (m×k)·(k×n) costs 2·m·n·k. Only matmuls are counted; norms, activations, softmax,
  rotary, residual adds, routing and the embedding lookups are ignored (O(d) per token).
- Attention scores QKᵀ and the weighted sum AV are counted over the *full* T×T square per head
  (SDPA's math path, which FlopCounterMode sees), i.e. 2·2·T·head_dim·n_heads FLOPs per token per
  layer, even though the causal mask makes half of it redundant. Sliding-window (local) layers
  count the same: spud computes them as a masked full square. Flash kernels skip masked tiles,
  so on them "achieved" MFU is slightly understated, the usual convention. GQA/MQA do not reduce
  attention FLOPs (every query head attends).
- A mixture of experts counts its router plus top_k expert MLPs per token (moe.py).
- 'forward' is inference: the LM head for every position, no auxiliary heads. 'training' is
  3 × the training forward (the backward of every matmul is two matmuls of the same size), which
  includes multi-token-prediction heads. Flash-attention backward additionally recomputes QKᵀ;
  being rematerialisation, not model work, that is not counted.
- The LM head (2·d·V per token) is counted, tied or not.
- A vision tower (model.vision) runs once per image, not per token: `image_flops` counts it
  (encoder and projector, same conventions; the encoder's attention over all its patches).
  Image placeholders are ordinary positions of the language model's sequence, so the per-token
  counts above already cover them.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from spud.errors import SpudError

if TYPE_CHECKING:
    from spud.config import ModelConfig


def _vocab(cfg: ModelConfig) -> int:
    if cfg.vocab_size is None:
        raise SpudError(
            "model.vocab_size is not set; parameter/FLOP counts need it (train a tokenizer or "
            "set model.vocab_size)"
        )
    return cfg.vocab_size


@lru_cache(maxsize=256)
def _config(key: str) -> ModelConfig:
    from spud.config import ModelConfig

    return ModelConfig.model_validate_json(key)


def _numel(params) -> int:
    return sum(p.numel() for p in params)


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """{'total', 'embedding', 'non_embedding', 'vision'}; equals Transformer(cfg).num_params().

    'embedding' counts the vocabulary-sized tables: every nn.Embedding of the language model
    (token and value embeddings), plus the LM head when it is not tied (a tied head is the same
    tensor, counted once). 'vision' is the vision tower (encoder + projector; 0 for a text
    model), part of 'total' and 'non_embedding'.
    """
    _vocab(cfg)
    return dict(_param_counts(cfg.model_dump_json()))


@lru_cache(maxsize=256)
def _meta_model(key: str) -> nn.Module:
    """The config's model on the meta device. A block class with a `layer_key(cfg, i)`
    staticmethod promises equal parameters and compute for layers with equal keys, so one block
    per key is built and repeated in model.blocks (the planner counts hundreds of deep candidate
    shapes); without it, every layer is built."""
    from spud.model.registry import get_block
    from spud.model.transformer import Transformer

    cfg = _config(key)
    block_cls = get_block(cfg.block)
    layer_key = getattr(block_cls, "layer_key", None)
    with torch.device("meta"), _MetaBuild():
        built: dict[object, nn.Module] = {}
        blocks = []
        for i in range(cfg.n_layers):
            k = layer_key(cfg, i) if layer_key is not None else i
            if k not in built:
                built[k] = block_cls(cfg, i)
            blocks.append(built[k])
        return Transformer(cfg, blocks=blocks)


class _MetaBuild(TorchFunctionMode):
    """Build a model on the meta device without running its initialisers: on meta they do no
    arithmetic but still cost ~1 ms each through the reference kernels, and the planner counts
    hundreds of candidate shapes. In-place init calls return their tensor untouched, and
    tensors are moved to meta without the copy's bookkeeping."""

    SKIP = {"normal_", "uniform_", "zero_", "fill_", "trunc_normal_"}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", None) in self.SKIP or getattr(func, "__module__", None) == "torch.nn.init":
            target = args[0] if args else (kwargs or {}).get("tensor")  # nn.init passes tensor=
            if isinstance(target, torch.Tensor):
                return target
        if func is torch.Tensor.to and args and isinstance(args[0], torch.Tensor) and (
            len(args) > 1 and str(args[1]) == "meta"
        ):
            return torch.empty_like(args[0], device="meta")
        return func(*args, **(kwargs or {}))


@lru_cache(maxsize=4096)
def _param_counts(key: str) -> tuple[tuple[str, int], ...]:
    cfg = _config(key)
    model = _meta_model(key)
    built = {id(b): b for b in model.blocks}.values()
    in_blocks = {id(p) for b in built for p in b.parameters()}
    shell = _numel(p for p in model.parameters() if id(p) not in in_blocks)
    per_block = {id(b): _numel(b.parameters()) for b in built}
    total = shell + sum(per_block[id(b)] for b in model.blocks._modules.values())
    embedding = _numel(m.weight for name, m in model.named_modules()
                       if isinstance(m, nn.Embedding) and not name.startswith("vision."))
    if not cfg.tie_embeddings:
        embedding += model.lm_head.weight.numel()
    vision = _numel(model.vision.parameters()) if cfg.vision is not None else 0
    return (("total", total), ("embedding", embedding), ("non_embedding", total - embedding),
            ("vision", vision))


def muon_param_count(cfg: ModelConfig) -> int:
    """Parameters that train.optimizer=muon gives to Muon (model/param_roles.py's 'matrix' role),
    counted on the meta model: Muon keeps one state tensor for them where AdamW keeps two."""
    _vocab(cfg)
    return _muon_param_count(cfg.model_dump_json())


@lru_cache(maxsize=1024)
def _muon_param_count(key: str) -> int:
    from spud.model.param_roles import param_roles

    model = _meta_model(key)
    # The meta model repeats one block object for layers with equal layer_key, and parameters
    # are listed once per object: weigh each by how many layers use its block.
    uses: dict[int, int] = {}
    for b in model.blocks:
        uses[id(b)] = uses.get(id(b), 0) + 1
    weight = {id(p): uses[id(b)] for b in model.blocks for p in b.parameters()}
    params = dict(model.named_parameters())
    return sum(params[n].numel() * weight.get(id(params[n]), 1)
               for n, role in param_roles(model).items() if role == "matrix")


def vision_shape(cfg: ModelConfig) -> dict[str, int]:
    """The vision encoder's sizes as built (an HF encoder's come from its directory): tokens
    (patches, plus CLIP's CLS), width, layers (those kept), heads, mlp_hidden."""
    enc = _meta_model(cfg.model_dump_json()).vision.encoder
    return {"tokens": enc.n_tokens + (getattr(enc, "family", "") == "clip"), "width": enc.width,
            "layers": enc.n_layers, "heads": enc.heads, "mlp_hidden": enc.mlp_hidden,
            "stem_values": enc.stem_values() if hasattr(enc, "stem_values") else enc.n_tokens * (3 * cfg.vision.patch_size**2 + enc.width)}


def image_flops(cfg: ModelConfig) -> dict[str, int]:
    """Matmul FLOPs per image of the vision tower: {'encoder', 'projector', 'forward',
    'training' (everything trained: 3 × forward, less the patch embedding's input gradient,
    which pixels never need), 'training_frozen_encoder' (the encoder's forward only, the
    projector trained: 3 × its forward less its first layer's input gradient)}; all 0 for a
    text-only model. tests/model/test_vision*.py check them against FlopCounterMode."""
    keys = ("encoder", "projector", "forward", "training", "training_frozen_encoder")
    if cfg.vision is None:
        return dict.fromkeys(keys, 0)
    _vocab(cfg)
    p = _meta_model(cfg.model_dump_json()).vision.flops_per_image()
    fwd = p["encoder"] + p["projector"]
    return {"encoder": p["encoder"], "projector": p["projector"], "forward": fwd,
            "training": 3 * fwd - p["patch_embed"],
            "training_frozen_encoder": p["encoder"] + 3 * p["projector"] - p["projector_in"]}


def flops_per_token(cfg: ModelConfig, seq_len: int) -> dict[str, int]:
    """Matmul FLOPs per token for sequences of seq_len: {'forward', 'training'} (see module doc).

    For the llama block this is, per layer and token, 2·(projection weights) +
    4·seq_len·head_dim·n_heads (QKᵀ and AV over the full square), plus 2·d_model·vocab for the
    LM head; tests/model/test_flops.py checks both that formula and FlopCounterMode on real runs.
    """
    if seq_len <= 0:
        raise SpudError(f"seq_len must be positive, got {seq_len}")
    _vocab(cfg)
    model = _meta_model(cfg.model_dump_json())
    forward = module_flops(model, seq_len)
    extra = sum(module_flops(m, seq_len, training=True)
                for m in model.modules() if getattr(m, "training_only", False))
    return {"forward": round(forward), "training": round(3 * (forward + extra))}


def module_flops(module: nn.Module, seq_len: int, training: bool = False) -> float:
    """Forward matmul FLOPs per token of `module`, read from its structure:
    - a module with a `flops_per_token(seq_len)` method reports its own (attention: its
      projections plus the T-dependent QKᵀ and AV; a mixture of experts: router + top_k experts);
    - an nn.Linear costs 2·in·out: every other module is assumed to apply each Linear it holds
      once per token, which covers blocks made of projections, spud's Attention and MLPs;
    - modules marked `training_only` (multi-token-prediction heads) count only when training;
    - everything else (embeddings, norms) costs nothing.
    A block that does anything else gives itself a flops_per_token method; the tests compare
    these counts with torch's FlopCounterMode on real forward/backward passes.
    """
    if getattr(module, "training_only", False) and not training:
        return 0
    own = getattr(module, "flops_per_token", None)
    if own is not None:
        return own(seq_len)
    if isinstance(module, nn.Linear):
        return 2 * module.in_features * module.out_features
    # _modules, not children(): a ModuleList that repeats a block (see _meta_model) counts it
    # once per layer.
    return sum(module_flops(m, seq_len) for m in module._modules.values() if m is not None)
