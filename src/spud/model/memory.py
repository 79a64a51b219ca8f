"""Bytes per device for training and serving a ModelConfig, before any tensor exists.

Conventions (all figures are per device, in bytes):

Model state, "ZeRO accounting" (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward
Training Trillion Parameter Models"), with Ψ = total parameters:
- precision "bf16" (mixed precision): bf16 weights 2Ψ + bf16 gradients 2Ψ + AdamW state 12Ψ
  (fp32 master copy 4Ψ + two fp32 moments 8Ψ) = 16Ψ.
- precision "fp32": fp32 weights 4Ψ + fp32 gradients 4Ψ + two fp32 moments 8Ψ = 16Ψ (no master).
- Muon (train.optimizer=muon, the default) keeps one fp32 momentum buffer (4 bytes) for the
  parameters it updates (model/param_roles.py's block matrices, flops.muon_param_count) where
  AdamW keeps two moments (8 bytes); the rest keep AdamW's 8. Its transient polar-factor buffers
  (one batch of same-shape matrices; whole matrices gathered under FSDP) are not counted.
- FSDP / ZeRO-3 with degree F shards all three by F; plain DDP (F = 1) replicates them. The
  data-parallel degree does not change per-device model state, only how many devices share the
  global batch.

Activations for one micro-batch of b sequences of s tokens, in the spirit of Korthikanti et al.
2022 ("Reducing Activation Recomputation in Large Transformer Models", whose per-layer figure is
s·b·h·(34 + 5·a·s/h) bytes for a GPT block with dropout and materialised T×T scores), recounted for
spud's llama-style block under SDPA/flash attention, which stores no T×T scores or dropout masks —
only q, k, v, the output and a per-row log-sum-exp. Counting, per token and layer, the tensors
autograd keeps for backward (h = d_model, f = MLP hidden, kv = n_kv_heads·head_dim):

    attention: norm input h + norm output h + q h + k,v 2·kv + attention output h   = 4h + 2kv
    MLP:       norm input h + norm output h + (swiglu: gate f, up f, product f = 3f;
               gelu/relu2: pre-activation f, activation f = 2f)
    per layer: p·s·b·(6h + 2kv + m·f) + 4·s·b·n_heads   (m = 3 swiglu / 2 otherwise; p = bytes
               per activation element; the last term is flash's fp32 log-sum-exp)
    LM head:   s·b·(p·h + (p + 4)·V)  (final-norm output; logits and their fp32 upcast for the loss)

With full activation checkpointing (every block recomputed in backward) only each block's input
survives the forward, p·s·b·h per layer, plus one block's full activations during its recompute.

KV cache for serving: n_layers · 2 (K and V) · n_kv_heads · head_dim · bytes · tokens.

Vision tower (model.vision), per image, counted the same way over its t encoder tokens of width
w (heads a, MLP hidden f, L layers) and the projector's tokens_per_image outputs of width d:
    encoder:   L·(p·t·(8w + 2f) + 4·t·a) + p·t·(3·patch² + w)   (a GELU-MLP pre-norm block per
               layer; the patch embedding's input and the final norm's)
    projector: p·tokens_per_image·(k²·w + 2d)                    (fc1 input, fc1 output, GELU)
With a frozen encoder only the projector's activations are kept. Its weights are in the parameter
count (param_counts 'vision'), so model state and serving weights include them.

These are estimates: allocator fragmentation, CUDA context (~0.5-1 GiB) and temporary buffers
are not modelled, so `fits` keeps a safety margin.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from spud.config import ModelConfig
from spud.errors import SpudError
from spud.model.flops import muon_param_count, param_counts

BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
# Share of device memory a plan may use: the rest is left for the CUDA context, the caching
# allocator's fragmentation and temporary buffers that this model does not count.
USABLE_FRACTION = 0.9


def _bytes(precision: str) -> int:
    if precision not in BYTES:
        raise SpudError(f"unknown precision {precision!r}; use one of {', '.join(BYTES)}")
    return BYTES[precision]


@dataclass
class MemoryEstimate:
    weights: float
    gradients: float
    optimizer: float
    activations: float
    kv_cache: float = 0.0

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.kv_cache

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def model_state_bytes(params: int, precision: str = "bf16", fsdp: int = 1,
                      muon_params: int = 0) -> dict[str, float]:
    """Weights, gradients and optimizer state per device (see module doc), sharded by `fsdp`;
    `muon_params` of the `params` take Muon (one fp32 state) instead of AdamW (two)."""
    if fsdp < 1:
        raise SpudError(f"fsdp degree must be >= 1, got {fsdp}")
    p = _bytes(precision)
    # Mixed precision keeps an fp32 master copy next to the 16-bit weights; fp32 training
    # updates the weights in place, so it needs none.
    master = 4 if p < 4 else 0
    return {
        "weights": p * params / fsdp,
        "gradients": p * params / fsdp,
        "optimizer": (master * params + 8 * (params - muon_params) + 4 * muon_params) / fsdp,
    }


def activation_bytes_per_layer(cfg: ModelConfig, micro_batch: int, seq_len: int, precision: str = "bf16") -> float:
    """Activations one block keeps for backward (module doc formula)."""
    p = _bytes(precision)
    h, f = cfg.d_model, cfg.hidden
    kv = cfg.kv_heads * cfg.dim_head
    # Hidden-sized tensors the MLP keeps (3 swiglu, 2 relu2/gelu: the MLP class says), once per
    # expert a token visits under MoE.
    from spud.model.registry import get_mlp

    m = getattr(get_mlp(cfg.mlp), "hidden_activations", 2) * (cfg.moe_top_k if cfg.moe_experts else 1)
    tokens = micro_batch * seq_len
    return p * tokens * (6 * h + 2 * kv + m * f) + 4 * tokens * cfg.n_heads


def activation_bytes(
    cfg: ModelConfig, micro_batch: int, seq_len: int, precision: str = "bf16", checkpointing: bool = False
) -> float:
    """Peak activations of one micro-batch's forward+backward (module doc formula)."""
    if cfg.vocab_size is None:
        raise SpudError("model.vocab_size must be set to estimate activation memory")
    p = _bytes(precision)
    tokens = micro_batch * seq_len
    layer = activation_bytes_per_layer(cfg, micro_batch, seq_len, precision)
    head = tokens * (p * cfg.d_model + (p + 4) * cfg.vocab_size)
    if checkpointing:
        return cfg.n_layers * p * tokens * cfg.d_model + layer + head
    return cfg.n_layers * layer + head


def vision_activation_bytes(cfg: ModelConfig, images: int, precision: str = "bf16",
                            train_encoder: bool = True) -> float:
    """Activations the vision tower keeps for backward for `images` images (module doc); 0 for a
    text-only model."""
    if cfg.vision is None or images == 0:
        return 0.0
    from spud.model.flops import vision_shape

    p, v = _bytes(precision), cfg.vision
    sh = vision_shape(cfg)
    t, w = sh["tokens"], sh["width"]
    projector = p * v.tokens_per_image * (v.pixel_shuffle**2 * w + 2 * cfg.d_model)
    encoder = sh["layers"] * (p * t * (8 * w + 2 * sh["mlp_hidden"]) + 4 * t * sh["heads"])
    encoder += p * sh["stem_values"]
    return images * (projector + (encoder if train_encoder else 0))


def kv_cache_bytes(cfg: ModelConfig, tokens: float, precision: str = "bf16") -> float:
    """KV cache for `tokens` cached positions (summed over all sequences in the batch)."""
    return cfg.n_layers * 2 * cfg.kv_heads * cfg.dim_head * _bytes(precision) * tokens


def _state(cfg: ModelConfig, precision: str, fsdp: int, optimizer: str) -> dict[str, float]:
    if optimizer not in ("adamw", "muon"):
        raise SpudError(f"unknown optimizer {optimizer!r} for the memory estimate; use adamw or muon")
    muon = muon_param_count(cfg) if optimizer == "muon" else 0
    return model_state_bytes(param_counts(cfg)["total"], precision, fsdp, muon)


def training_memory(
    cfg: ModelConfig,
    micro_batch: int,
    seq_len: int,
    precision: str = "bf16",
    fsdp: int = 1,
    checkpointing: bool = False,
    images: int = 0,
    optimizer: str = "adamw",
) -> MemoryEstimate:
    """Per-device memory to train `cfg` with `optimizer` (adamw | muon; module doc conventions);
    `images` per micro-batch add the vision tower's activations."""
    state = _state(cfg, precision, fsdp, optimizer)
    act = activation_bytes(cfg, micro_batch, seq_len, precision, checkpointing)
    act += vision_activation_bytes(cfg, images, precision)
    return MemoryEstimate(**state, activations=act)


def serving_memory(cfg: ModelConfig, kv_tokens: float, precision: str = "bf16", tensor_parallel: int = 1) -> MemoryEstimate:
    """Per-device memory to serve: weights + KV cache, both split over `tensor_parallel` devices."""
    w = _bytes(precision) * param_counts(cfg)["total"] / tensor_parallel
    return MemoryEstimate(weights=w, gradients=0.0, optimizer=0.0, activations=0.0,
                          kv_cache=kv_cache_bytes(cfg, kv_tokens, precision) / tensor_parallel)


@dataclass
class Parallelism:
    strategy: str  # "DDP", "FSDP" or "does not fit"
    fsdp: int
    checkpointing: bool
    micro_batch: int
    memory: MemoryEstimate
    note: str = ""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["memory"] = self.memory.to_dict()
        return d


def max_micro_batch(
    cfg: ModelConfig, seq_len: int, device_bytes: float, precision: str = "bf16", fsdp: int = 1,
    checkpointing: bool = False, limit: int = 1024, optimizer: str = "adamw",
) -> int:
    """Largest micro-batch (sequences) that fits; 0 when not even one does."""
    budget = USABLE_FRACTION * device_bytes
    state = sum(_state(cfg, precision, fsdp, optimizer).values())
    per_seq = activation_bytes(cfg, 1, seq_len, precision, checkpointing)  # linear in micro-batch
    if state + per_seq > budget:
        return 0
    return int(min(limit, (budget - state) // per_seq))


def suggest_parallelism(
    cfg: ModelConfig, seq_len: int, n_devices: int, device_bytes: float, precision: str = "bf16",
    optimizer: str = "adamw",
) -> Parallelism:
    """Cheapest layout that fits one sequence per device: DDP, then DDP + checkpointing, then the
    smallest power-of-two FSDP degree ≤ n_devices (without, then with checkpointing).

    DDP is preferred because it has the least communication (one all-reduce of gradients per
    step); FSDP adds an all-gather of weights in forward and backward, so its degree is kept as
    small as fits.
    """
    degrees = [1]
    while degrees[-1] * 2 <= max(1, n_devices):
        degrees.append(degrees[-1] * 2)
    for fsdp in degrees:
        for ckpt in (False, True):
            mb = max_micro_batch(cfg, seq_len, device_bytes, precision, fsdp, ckpt, optimizer=optimizer)
            if mb >= 1:
                mem = training_memory(cfg, mb, seq_len, precision, fsdp, ckpt, optimizer=optimizer)
                strategy = "DDP" if fsdp == 1 else "FSDP"
                note = f"micro-batch {mb}×{seq_len}" + (", activation checkpointing" if ckpt else "")
                return Parallelism(strategy, fsdp, ckpt, mb, mem, note)
    mem = training_memory(cfg, 1, seq_len, precision, degrees[-1], True, optimizer=optimizer)
    return Parallelism("does not fit", degrees[-1], True, 0, mem,
                       "needs more devices, tensor/pipeline parallelism or a smaller model")
