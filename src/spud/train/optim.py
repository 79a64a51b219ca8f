"""Optimizers: AdamW (train.optimizer=adamw), or Muon for the blocks' weight matrices with AdamW
for everything else (train.optimizer=muon).

AdamW: weight decay only on matrices that are not embeddings. Decaying norm gains, biases or the
embedding table hurts small models (it shrinks what should be free scale parameters). Fused AdamW
on CUDA and CPU (one kernel per parameter group instead of a dozen elementwise passes).

Muon (Jordan et al. 2024, https://kellerjordan.github.io/posts/muon/): SGD with Nesterov momentum
whose update for each weight matrix is replaced by the nearest semi-orthogonal matrix (all singular
values ≈ 1): every direction of the matrix moves by the same amount, instead of the few directions
that dominate a raw gradient. Choices, and why:

- Orthogonalisation: Polar Express (Amsel, Persson, Musco, Gower 2025, arXiv:2505.16932), i.e. the
  same quintic iteration X ← aX + (bA + cA²)X, A = XXᵀ as Newton–Schulz "NS5", but with a separate,
  minimax-optimal (a, b, c) per iteration. At the same cost (5 iterations) it is far tighter: for
  every singular value ≥ 1e-3·‖G‖_F the result lies in [0.853, 1.141] (exact arithmetic, computed
  from the scalar polynomials) where NS5's fixed (3.4445, -4.7750, 2.0315) gives [0.47, 1.20].
  Iterations past 5 use the classical quintic (15/8, -5/4, 3/8), which converges to exactly 1.
  fp32 on CPU; bf16 on CUDA (the iteration is stable in bf16, and its matmuls dominate the cost).
- Fused projections are orthogonalised per piece: the q | k | v rows of a fused QKV weight and the
  gate | up rows of SwiGLU are separate matrices in the math (and in Hugging Face Llama), so each
  gets its own polar factor, as if unfused. A module can declare others with `muon_row_splits`.
- LR scaling: the spectral rule lr · sqrt(max(1, fan_out/fan_in)) (Keller Jordan; Bernstein's
  modular norm). It keeps the update's spectral norm proportional to sqrt(fan_out/fan_in), the
  condition under which a learning rate transfers across width, which is what an ablation on two
  model sizes needs. (The alternative, 0.2·sqrt(max(A, B)) to match AdamW's update RMS, lets Muon
  reuse AdamW's LR but makes the best LR depend on width.) Default train.muon_lr = 0.02.
- Weight decay is decoupled and scaled by the LR: W ← W·(1 − lr·wd) (train.muon_weight_decay).
- Momentum warms up linearly from train.muon_momentum_start to train.muon_momentum over
  train.muon_momentum_warmup_steps; the LR schedule (schedule.py) applies to every group.

Which parameters take Muon: the weights of nn.Linear modules inside `model.blocks` (and raw ≥3-D
parameters there, e.g. stacked expert matrices, orthogonalised per matrix). Embeddings (also
value embeddings inside blocks), the LM head, norms, gains, biases and anything outside the
blocks take AdamW: the embedding's "input" is one-hot and the head's output is a softmax, so the
spectral argument for Muon does not hold for them.

Cost: one process orthogonalises all matrices of one shape (across layers) as one batch, so a
whole model's update is a few batched matmul chains (see benchmarks/optimizer_step.py).

Distributed (DDP / FSDP2): a matrix must be orthogonalised whole. Matrices are dealt out in
turns: in each round of world_size matrices, rank i owns the i-th; under FSDP every rank first
all-gathers each of the round's momentum-updated gradients (DTensor.full_tensor), then each owner
orthogonalises its matrix and broadcasts the result, and every rank applies its own rows (its FSDP
shard, or the whole matrix under DDP). This splits the orthogonalisation work over ranks, and
under DDP it keeps replicas bit-identical by construction even where two ranks' BLAS would round
differently. Momentum buffers live with the parameters (sharded DTensors under FSDP), so
checkpoints reshard like AdamW state.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from spud.config import TrainConfig
from spud.errors import SpudError
from spud.model.param_roles import param_roles  # noqa: F401  (re-exported: tests, callers)

# Polar Express coefficients for 5 iterations (arXiv:2505.16932, computed for lower spectral
# bound 1e-3, safety factor 2e-2, cushion 2); the first k are used for k < 5 iterations.
POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
QUINTIC_TO_ONE = (15 / 8, -10 / 8, 3 / 8)  # p(1) = 1, p'(1) = 0: polishes toward exactly 1


def polar_factor(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """≈ U·Vᵀ of g = U·S·Vᵀ for each matrix in the last two dims (batched), in g's dtype.

    With steps=5, singular values ≥ 1e-3·‖g‖_F come out in [0.853, 1.141] (fp32 adds ~1e-3);
    smaller ones are raised toward, but not all the way to, that band."""
    lead, (m, n) = g.shape[:-2], g.shape[-2:]
    x = g.reshape(-1, m, n)
    # Frobenius ≥ spectral norm, so this puts every singular value in (0, 1/1.01].
    x = x / (x.norm(dim=(-2, -1), keepdim=True) * 1.01 + 1e-7)
    tall = m > n
    if tall:  # work with the smaller Gram matrix: A is min(m, n)², not max(m, n)²
        x = x.mT
    coeffs = POLAR_EXPRESS[:steps] + (QUINTIC_TO_ONE,) * max(0, steps - len(POLAR_EXPRESS))
    for a, b, c in coeffs:
        gram = torch.bmm(x, x.mT)
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b·A + c·A²
        x = torch.baddbmm(x, poly, x, beta=a)  # a·X + (b·A + c·A²)·X
    if tall:
        x = x.mT
    return x.reshape(*lead, m, n)


def muon_updates(grads: list[torch.Tensor], row_splits: list[list[int] | None], steps: int,
                 dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """Orthogonalised, spectrally scaled updates for weights (..., out, in), in `dtype`.

    Each row block of a weight's `row_splits` (e.g. q | k | v) is its own matrix. All matrices of
    one shape, across weights and layers, go through polar_factor as one batch (tall ones
    transposed: polar(Gᵀ) = polar(G)ᵀ), so a whole model is a handful of batched matmul chains
    rather than one chain per matrix: fewer, larger kernels, which matters most on CPU."""
    out = [torch.empty(g.shape, dtype=dtype, device=g.device) for g in grads]
    buckets: dict[tuple[int, int], list[tuple]] = {}  # (short side, long side) → pieces
    for i, (g, splits) in enumerate(zip(grads, row_splits, strict=True)):
        rows, cols = g.shape[-2:]
        start = 0
        for size in splits if splits and sum(splits) == rows else [rows]:
            piece = g[..., start:start + size, :].reshape(-1, size, cols)
            tall = size > cols
            buckets.setdefault((min(size, cols), max(size, cols)), []).append(
                (i, start, size, tall, piece.mT if tall else piece))
            start += size
    for pieces in buckets.values():
        ortho = polar_factor(torch.cat([pc[4] for pc in pieces]).to(dtype), steps)
        k = 0
        for i, start, size, tall, piece in pieces:
            o = ortho[k:k + piece.shape[0]]
            k += piece.shape[0]
            cols = out[i].shape[-1]
            o = (o.mT if tall else o) * math.sqrt(max(1.0, size / cols))
            out[i][..., start:start + size, :] = o.reshape(*out[i].shape[:-2], size, cols)
    return out


def muon_update(g: torch.Tensor, steps: int, row_splits: list[int] | None = None,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """muon_updates for one weight."""
    return muon_updates([g], [row_splits], steps, dtype)[0]


# ----------------------------------------------------------------------------- parameter roles
def _fused_row_splits(model: nn.Module) -> dict[int, list[int]]:
    """id(weight) → row blocks for fused projections that are several matrices in the math."""
    splits: dict[int, list[int]] = {}
    for m in model.modules():
        declared = getattr(m, "muon_row_splits", None)
        if isinstance(m, nn.Linear) and declared:
            splits[id(m.weight)] = list(declared)
        qkv = getattr(m, "qkv", None)
        if isinstance(qkv, nn.Linear) and all(hasattr(m, a) for a in ("n_heads", "n_kv_heads", "head_dim")):
            q, kv = m.n_heads * m.head_dim, m.n_kv_heads * m.head_dim
            splits.setdefault(id(qkv.weight), [q, kv, kv])
        gate_up = getattr(m, "gate_up", None)
        if isinstance(gate_up, nn.Linear) and hasattr(m, "hidden"):
            splits.setdefault(id(gate_up.weight), [m.hidden, m.hidden])
    return splits


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices that are not embeddings, none on the rest."""
    roles = param_roles(model)
    params = dict(model.named_parameters())
    decay = [params[n] for n, r in roles.items() if r in ("matrix", "other_matrix", "head")]
    no_decay = [params[n] for n, r in roles.items() if r in ("embedding", "scalar")]
    return [
        {"params": decay, "weight_decay": weight_decay, "lr_ratio": 1.0},
        {"params": no_decay, "weight_decay": 0.0, "lr_ratio": 1.0},
    ]


def muon_param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """One Muon group (block matrices) and up to four AdamW groups, each with its LR as a ratio
    to train.lr (the schedule scales them all alike). Empty groups are left out."""
    roles = param_roles(model)
    params = dict(model.named_parameters())

    def pick(*which: str) -> list:
        return [params[n] for n, r in roles.items() if r in which]

    groups = [
        dict(name="muon", kind="muon", params=pick("matrix"), lr_ratio=cfg.muon_lr / cfg.lr,
             weight_decay=cfg.muon_weight_decay, momentum=cfg.muon_momentum_start, ns_steps=cfg.muon_ns_steps),
        dict(name="embedding", kind="adamw", params=pick("embedding"),
             lr_ratio=(cfg.embed_lr or cfg.lr) / cfg.lr, weight_decay=0.0),
        dict(name="head", kind="adamw", params=pick("head"),
             lr_ratio=(cfg.head_lr or cfg.lr) / cfg.lr, weight_decay=cfg.weight_decay),
        dict(name="other_matrix", kind="adamw", params=pick("other_matrix"), lr_ratio=1.0,
             weight_decay=cfg.weight_decay),
        dict(name="scalar", kind="adamw", params=pick("scalar"), lr_ratio=1.0, weight_decay=0.0),
    ]
    return [g for g in groups if g["params"]]


# ----------------------------------------------------------------------------- the optimizer
def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a (possibly FSDP-sharded DTensor) tensor; in-place ops on it update it."""
    return t.to_local() if hasattr(t, "to_local") else t


def _gather(local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The whole matrix from every rank's shard (an all-gather) when `like` is a DTensor."""
    if not hasattr(like, "device_mesh"):
        return local
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, like.device_mesh, like.placements, run_check=False,
                              shape=like.shape, stride=like.stride()).full_tensor()


def _own_shard(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a full tensor that every rank holds identically (no communication)."""
    if not hasattr(like, "device_mesh"):
        return full
    from torch.distributed.tensor import distribute_tensor

    try:
        return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to_local()
    except TypeError:  # torch < 2.6: no src_data_rank (then rank 0's copy is scattered)
        return distribute_tensor(full, like.device_mesh, like.placements).to_local()


class MuonAdamW(torch.optim.Optimizer):
    """Muon for groups with kind='muon', AdamW (decoupled decay, bias-corrected) for the others.
    State: momentum_buffer per Muon matrix; step, exp_avg, exp_avg_sq per AdamW tensor."""

    def __init__(self, groups: list[dict], betas: tuple[float, float], eps: float,
                 compute_dtype: torch.dtype = torch.float32, parallel: str = "none",
                 row_splits: dict[int, list[int]] | None = None) -> None:
        defaults = dict(lr=0.0, weight_decay=0.0, betas=betas, eps=eps, kind="adamw", lr_ratio=1.0,
                        momentum=0.95, ns_steps=5)
        super().__init__(groups, defaults)
        self.compute_dtype = compute_dtype
        self.parallel = parallel
        self.row_splits = row_splits or {}

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            (self._muon if group["kind"] == "muon" else self._adamw)(group)
        return loss

    def _adamw(self, group: dict) -> None:
        (b1, b2), lr, wd, eps = group["betas"], group["lr"], group["weight_decay"], group["eps"]
        for p in group["params"]:
            if p.grad is None:
                continue
            st = self.state[p]
            if not st:
                st["step"] = torch.tensor(0.0)
                st["exp_avg"] = torch.zeros_like(p)
                st["exp_avg_sq"] = torch.zeros_like(p)
            st["step"] += 1
            n = st["step"].item()
            x, g, m, v = (_local(t) for t in (p, p.grad, st["exp_avg"], st["exp_avg_sq"]))
            if wd:
                x.mul_(1 - lr * wd)
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (v.sqrt() / math.sqrt(1 - b2**n)).add_(eps)
            x.addcdiv_(m, denom, value=-lr / (1 - b1**n))

    def _lookahead(self, p: torch.Tensor, momentum: float) -> torch.Tensor:
        """Update the momentum buffer; return the Nesterov gradient, whole (gathered under FSDP)."""
        buf = self.state[p].get("momentum_buffer")
        if buf is None:
            buf = self.state[p]["momentum_buffer"] = torch.zeros_like(p)
        g, b = _local(p.grad), _local(buf)
        b.lerp_(g, 1 - momentum)  # EMA of gradients
        return _gather(g.lerp(b, momentum), p)  # Nesterov: look one step ahead

    def _muon(self, group: dict) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        world = dist.get_world_size() if self.parallel != "none" and dist.is_initialized() else 1
        rank = dist.get_rank() if world > 1 else 0
        steps, dtype = group["ns_steps"], self.compute_dtype
        # One process: all matrices in one batched pass. Ranks: rounds of `world` matrices in which
        # rank i orthogonalises the i-th and broadcasts it (at most `world` whole matrices at once).
        per_round = world if world > 1 else max(1, len(params))
        for start in range(0, len(params), per_round):
            round_ = params[start:start + per_round]
            full = [self._lookahead(p, group["momentum"]) for p in round_]
            splits = [self.row_splits.get(id(p)) for p in round_]
            if world == 1:
                updates = muon_updates(full, splits, steps, dtype)
            else:
                updates, pending = [], []
                for i, (u, sp) in enumerate(zip(full, splits)):
                    upd = (muon_update(u, steps, sp, dtype) if i == rank
                           else torch.empty(u.shape, dtype=dtype, device=u.device))
                    pending.append(dist.broadcast(upd, src=i, async_op=True))
                    updates.append(upd)
                for work in pending:
                    work.wait()
            for p, upd in zip(round_, updates):
                x = _local(p)
                if group["weight_decay"]:
                    x.mul_(1 - group["lr"] * group["weight_decay"])
                x.add_(_own_shard(upd, p).to(x.dtype), alpha=-group["lr"])


# ----------------------------------------------------------------------------- construction
def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device,
                    parallel: str = "none") -> torch.optim.Optimizer:
    """The optimizer train.optimizer names, over `model` (already wrapped for DDP/FSDP).
    Each group carries lr_ratio: its peak LR over train.lr (see apply_schedule)."""
    if cfg.optimizer == "muon":
        return MuonAdamW(
            muon_param_groups(model, cfg), betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
            compute_dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
            parallel=parallel, row_splits=_fused_row_splits(model),
        )
    kwargs = {"fused": True} if device.type in ("cuda", "cpu") else {"foreach": True}
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        **kwargs,
    )


def muon_momentum_at(step: int, cfg: TrainConfig) -> float:
    """Muon momentum for optimizer step `step` (0-based): linear warm-up, then constant."""
    warm = cfg.muon_momentum_warmup_steps
    frac = min(1.0, step / warm) if warm else 1.0
    return cfg.muon_momentum_start + (cfg.muon_momentum - cfg.muon_momentum_start) * frac


def apply_schedule(optimizer: torch.optim.Optimizer, lr: float, step: int, cfg: TrainConfig) -> None:
    """Set every group's LR for this step (`lr`: the scheduled train.lr, × the group's lr_ratio)
    and the Muon momentum. A pure function of the step, so resuming needs no scheduler state."""
    momentum = muon_momentum_at(step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_ratio", 1.0)
        if group.get("kind") == "muon":
            group["momentum"] = momentum


def check_resumable(saved_config: dict, cfg: TrainConfig, ckpt: str) -> None:
    """Optimizer state only loads into the optimizer that wrote it; say so before trying."""
    saved = (saved_config.get("train") or {}).get("optimizer", "adamw")
    if saved != cfg.optimizer:
        raise SpudError(
            f"{ckpt} was trained with train.optimizer={saved}, and its optimizer state does not fit "
            f"train.optimizer={cfg.optimizer}; resume with train.optimizer={saved}, or start a new "
            "--out directory (e.g. `spud train CONFIG train.optimizer=...`)"
        )
