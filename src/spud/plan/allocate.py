"""Serving capacity, the training/serving split of an accelerator pool, and over-training.

Decode (one new token per sequence per step) is memory-bound: every step streams all weights
plus every sequence's KV cache from device memory, so at batch size b

    step time t(b) = max( (W + b·kv·ctx) / bandwidth ,  b·F_fwd / (peak·mfu) ),  tokens/s = b / t(b)

with W the weight bytes, kv the KV-cache bytes per token, ctx the mean context length during
decode (prompt + completion/2) and F_fwd the forward FLOPs per token. b is the largest batch whose
KV cache (at full context, prompt + completion) fits next to the weights and whose step time
stays within the per-token latency target. Prefill is compute-bound: prompt tokens/s =
peak·mfu / F_fwd(prompt). This is the standard roofline view of LLM inference (e.g. Pope et al.
2022, "Efficiently Scaling Transformer Inference"); it ignores batching inefficiencies and demand
peaks, so real fleets need headroom above the averages computed here.

Over-training (Sardana et al. 2024, "Beyond Chinchilla-Optimal: Accounting for Inference in
Language Model Scaling Laws"): when a model will process I tokens in its lifetime, the cheapest
model reaching the Chinchilla-optimal loss ℓ* minimises 6·N·D(N) + 2·N·I over N, where D(N)
solves L(N, D) = ℓ*. Smaller N needs more D but is cheaper to serve.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from spud.config import ModelConfig
from spud.model.flops import flops_per_token, param_counts
from spud.plan.fit import ScalingLaw
from spud.model.memory import USABLE_FRACTION, kv_cache_bytes
from spud.plan.profiles import HardwareProfile

SECONDS_PER_DAY = 86400.0


@dataclass
class ServingEstimate:
    tensor_parallel: int  # devices holding one model replica
    batch: int  # concurrent sequences per replica
    decode_tokens_per_s: float  # per device
    prefill_tokens_per_s: float  # per device
    step_latency_ms: float  # time per output token at that batch
    limited_by: str  # "memory", "latency" or "max batch"
    devices_needed: float  # fractional, for the demand; the plan rounds up
    demand_decode_tokens_per_s: float
    demand_prefill_tokens_per_s: float

    def to_dict(self) -> dict:
        return asdict(self)


def serving_estimate(
    cfg: ModelConfig, hw: HardwareProfile, requests_per_day: float, prompt_tokens: int,
    completion_tokens: int, latency_ms: float | None = None, mfu: float | None = None,
    precision: str = "bf16", max_batch: int = 1024,
) -> ServingEstimate:
    """Throughput per device and devices needed for an average demand (module doc model)."""
    mfu = mfu or hw.mfu
    peak = hw.peak(precision) * mfu
    weight_bytes = 2 * param_counts(cfg)["total"] if precision != "fp32" else 4 * param_counts(cfg)["total"]
    kv_tok = kv_cache_bytes(cfg, 1, precision)
    ctx_full = prompt_tokens + completion_tokens
    ctx_mean = prompt_tokens + completion_tokens / 2
    # Smallest tensor-parallel group whose memory holds the weights with room for some KV cache.
    tp = 1
    while weight_bytes / tp > 0.7 * USABLE_FRACTION * hw.memory_bytes and tp < 64:
        tp *= 2
    mem, bw = tp * USABLE_FRACTION * hw.memory_bytes, tp * hw.bandwidth
    fwd = flops_per_token(cfg, max(1, int(ctx_mean)))["forward"]

    def step_time(b: int) -> float:
        return max((weight_bytes + b * kv_tok * ctx_mean) / bw, b * fwd / (tp * peak))

    b_mem = int(max(1, (mem - weight_bytes) // max(1.0, kv_tok * ctx_full)))
    b, limited = min(b_mem, max_batch), "memory" if b_mem <= max_batch else "max batch"
    if latency_ms is not None and step_time(b) * 1e3 > latency_ms:
        lo, hi = 1, b  # step time grows with b: bisect the largest b within the latency target
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if step_time(mid) * 1e3 <= latency_ms else (lo, mid - 1)
        b, limited = lo, "latency"
    decode = b / step_time(b) / tp
    prefill = peak / flops_per_token(cfg, max(1, prompt_tokens))["forward"]
    need_dec = requests_per_day * completion_tokens / SECONDS_PER_DAY
    need_pre = requests_per_day * prompt_tokens / SECONDS_PER_DAY
    # A device time-shares prefill and decode, so the fractions of a device each needs add up.
    devices = need_dec / decode + need_pre / prefill if requests_per_day > 0 else 0.0
    return ServingEstimate(tp, b, decode, prefill, step_time(b) * 1e3, limited, devices, need_dec, need_pre)


def serving_devices(est: ServingEstimate) -> int:
    """Whole devices to reserve: round up to whole model replicas (tensor-parallel groups)."""
    if est.devices_needed <= 0:
        return 0
    return math.ceil(est.devices_needed / est.tensor_parallel) * est.tensor_parallel


@dataclass
class OvertrainResult:
    inference_tokens: float
    target_loss: float
    chinchilla: dict  # {N, D, train_flops, inference_flops, total_flops}
    best: dict  # the cheapest N ≤ N* reaching target_loss
    saving: float  # fraction of total FLOPs saved versus the Chinchilla-optimal model
    scan: list[dict]

    def to_dict(self) -> dict:
        return asdict(self)


def overtrain_scan(law: ScalingLaw, C: float, inference_tokens: float, points: int = 61) -> OvertrainResult:
    """Sardana et al. 2024 trade-off at the loss of the Chinchilla-optimal model for budget C.

    Scans N from N*/30 up to N* (log-spaced, N* included) and keeps the N minimising training
    plus lifetime inference FLOPs, 6·N·D(N) + 2·N·I, at equal predicted loss.
    """
    n_opt, d_opt = law.optimal(C)
    target = float(law.loss(n_opt, d_opt))

    def row(n: float) -> dict:
        d = float(law.tokens_for_loss(n, target)) if n < n_opt else d_opt
        train = 6 * n * d
        inf = 2 * n * inference_tokens
        return {"N": n, "D": d, "tokens_per_param": d / n, "train_flops": train,
                "inference_flops": inf, "total_flops": train + inf}

    scan = [row(float(n)) for n in n_opt * np.logspace(-1.5, 0, points)]
    scan = [r for r in scan if math.isfinite(r["D"])]  # N too small to ever reach the loss
    best = min(scan, key=lambda r: r["total_flops"])
    chin = row(n_opt)
    return OvertrainResult(inference_tokens, target, chin, best,
                           1 - best["total_flops"] / chin["total_flops"], scan)
