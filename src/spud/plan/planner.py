"""`spud plan`: from a budget (FLOPs, accelerator-days or dollars) to a concrete training run.

Steps: compute budget C → compute-optimal N*, D* under a scaling law (closed form, fit.py) →
the ModelConfig closest to N* (presets and a grid of shapes) → wall-clock, cost, memory per
device and a parallelism layout on the chosen hardware → with serving demand, the accelerators
serving needs and what is left for training (allocate.py), and the over-training trade-off.

The default law is the Chinchilla law as re-fitted by Besiroglu et al. 2024 ("Chinchilla
Scaling: A replication attempt"): E=1.82, A=482.01, B=2085.43, α=0.3478, β=0.3658; Hoffmann et
al. 2022's original constants were E=1.69, A=406.4, B=410.7, α=0.34, β=0.28 (fit.CHINCHILLA_HOFFMANN).
"""

from __future__ import annotations

import json as _json
import math
from dataclasses import dataclass
from pathlib import Path

from spud.config import ModelConfig, TrainConfig
from spud.errors import SpudError
from spud.model.flops import flops_per_token, param_counts
from spud.model.presets import PRESETS
from spud.plan.allocate import (
    SECONDS_PER_DAY,
    overtrain_scan,
    serving_devices,
    serving_estimate,
)
from spud.plan.fit import CHINCHILLA, ScalingLaw, predict_interval
from spud.model.memory import suggest_parallelism
from spud.plan.profiles import HardwareProfile, get_profile
from spud.plan.vision_plan import DEFAULT_TEXT_TOKENS, load_vision_config, vision_stage

DEFAULT_OPTIMIZER = TrainConfig.model_fields["optimizer"].default
OPTIMIZER_NAME = {"muon": "Muon+AdamW", "adamw": "AdamW"}[DEFAULT_OPTIMIZER]

# Muennighoff et al. 2023 ("Scaling Data-Constrained Language Models"): up to ~4 epochs of
# repeated data are worth almost as much as fresh data; beyond that returns fall off quickly.
MAX_USEFUL_EPOCHS = 4


@dataclass
class Budget:
    flops: float
    source: str  # "budget", "gpus×days" or "dollars"
    hardware: HardwareProfile
    mfu: float
    precision: str

    @property
    def effective_flops_per_s(self) -> float:
        """Achieved FLOP/s of one device: peak × MFU."""
        return self.hardware.peak(self.precision) * self.mfu


def compute_budget(
    budget: float | None = None, hw: HardwareProfile | None = None, gpus: int | None = None,
    days: float | None = None, dollars: float | None = None, mfu: float | None = None,
    precision: str = "bf16",
) -> Budget:
    """FLOPs from --budget, else from --gpu/--gpus/--days, else from --dollars.

    gpus×days: C = gpus · days · 86400 s · peak · MFU.  dollars: C = dollars / (price per
    device-hour) · 3600 s · peak · MFU, i.e. the device-hours the money buys.
    """
    hw = hw or get_profile("H100")
    mfu = mfu or hw.mfu
    if budget is not None:
        if budget <= 0:
            raise SpudError(f"--budget must be positive FLOPs, got {budget}")
        return Budget(float(budget), "budget", hw, mfu, precision)
    rate = hw.peak(precision) * mfu
    if gpus is not None and days is not None:
        if gpus <= 0 or days <= 0:
            raise SpudError("--gpus and --days must be positive")
        return Budget(gpus * days * SECONDS_PER_DAY * rate, "gpus×days", hw, mfu, precision)
    if dollars is not None:
        if hw.price_per_hour <= 0:
            raise SpudError(f"hardware {hw.name!r} has no price_per_hour; --dollars cannot be converted")
        return Budget(dollars / hw.price_per_hour * 3600 * rate, "dollars", hw, mfu, precision)
    raise SpudError("give a budget: --budget FLOPS, or --gpu NAME --gpus N --days D, or --dollars USD")


# ------------------------------------------------------------------------------ model shapes
def _shape(d_model: int, n_layers: int, vocab_size: int, seq_len: int) -> ModelConfig:
    # Head size 64 for small models, 128 from d_model 2048 (as in Llama-class models); GQA with
    # 8 KV heads once there are enough heads, which shrinks the KV cache that bounds serving.
    hd = 128 if d_model >= 2048 else 64
    heads = max(1, d_model // hd)
    kv = next((k for k in (8, 4) if heads > k and heads % k == 0), None)
    return ModelConfig(d_model=d_model, n_layers=n_layers, n_heads=heads, n_kv_heads=kv,
                       vocab_size=vocab_size, max_seq_len=seq_len)


def candidate_configs(n_target: float, vocab_size: int, seq_len: int, n_counts: str) -> list[tuple[str, ModelConfig]]:
    """Presets, plus for each width on a grid the depth giving ~n_target params within an aspect
    ratio of 64-128 d_model per layer (Kaplan et al. 2020 find loss nearly flat across such
    shapes at fixed N, so the shape is chosen for matmul-friendly sizes and the parameter target)."""
    out = [(name, ModelConfig(preset=name, vocab_size=vocab_size, max_seq_len=seq_len)) for name in PRESETS]
    widths = list(range(64, 1024, 64)) + list(range(1024, 2048, 128)) + list(range(2048, 16385, 512))
    for d in widths:
        one, two = (param_counts(_shape(d, n, vocab_size, seq_len)) for n in (1, 2))
        per_layer = two["non_embedding"] - one["non_embedding"]
        fixed = one[n_counts] - per_layer  # embeddings (if counted) and the final norm
        ideal = max(1.0, (n_target - fixed) / per_layer)
        lo, hi = max(1, math.ceil(d / 128)), max(1, math.floor(d / 64))
        for n in {min(max(math.floor(ideal), lo), hi), min(max(math.ceil(ideal), lo), hi)}:
            out.append((f"{d}x{n}", _shape(d, n, vocab_size, seq_len)))
    return out


def choose_config(n_target: float, vocab_size: int = 32768, seq_len: int = 2048,
                  n_counts: str = "total") -> tuple[str, ModelConfig]:
    """The candidate whose parameter count (as the law counts N) is closest in log ratio."""
    cands = candidate_configs(n_target, vocab_size, seq_len, n_counts)
    return min(cands, key=lambda c: abs(math.log(param_counts(c[1])[n_counts] / n_target)))


def config_fields(name: str, cfg: ModelConfig) -> dict:
    counts = param_counts(cfg)
    return {
        "name": name, "preset": cfg.preset, "d_model": cfg.d_model, "n_layers": cfg.n_layers,
        "n_heads": cfg.n_heads, "n_kv_heads": cfg.kv_heads, "head_dim": cfg.dim_head,
        "mlp": cfg.mlp, "mlp_hidden": cfg.hidden, "vocab_size": cfg.vocab_size,
        "max_seq_len": cfg.max_seq_len, "params_total": counts["total"],
        "params_non_embedding": counts["non_embedding"],
        "d_model_per_layer": cfg.d_model / cfg.n_layers,
    }


# ------------------------------------------------------------------------------------- plan
def _load_law(law: str | ScalingLaw | None) -> ScalingLaw:
    if law is None:
        return CHINCHILLA
    return law if isinstance(law, ScalingLaw) else ScalingLaw.from_json(law)


def _train_plan(law: ScalingLaw, C: float, bud: Budget, gpus: int | None, vocab_size: int, seq_len: int) -> dict:
    n_star, d_star = law.optimal(C)
    name, cfg = choose_config(n_star, vocab_size, seq_len, law.n_counts)
    train_flops = flops_per_token(cfg, seq_len)["training"] * d_star  # spud's exact count
    devices = gpus or 1
    seconds = train_flops / (devices * bud.effective_flops_per_s)
    hours = seconds / 3600
    # The plan is for spud's default recipe, so its optimizer state is the default optimizer's.
    par = suggest_parallelism(cfg, seq_len, devices, bud.hardware.memory_bytes, bud.precision,
                              optimizer=DEFAULT_OPTIMIZER)
    n_model = param_counts(cfg)[law.n_counts]
    return {
        "C": C, "N_star": n_star, "D_star": d_star, "tokens_per_param": d_star / n_star,
        "loss": float(law.loss(n_star, d_star)),
        "loss_interval": predict_interval(law, n_star, d_star),
        "loss_of_config": float(law.loss(n_model, d_star)),
        "config": config_fields(name, cfg), "_cfg": cfg,
        "train_flops_exact": train_flops, "devices": devices,
        "wall_clock_days": seconds / SECONDS_PER_DAY, "device_hours": hours * devices,
        "cost_usd": hours * devices * bud.hardware.price_per_hour,
        "parallelism": par.to_dict(),
    }


def plan(
    budget: float | None = None, gpu: str | None = None, gpus: int | None = None, days: float | None = None,
    dollars: float | None = None, law: str | ScalingLaw | None = None, mfu: float | None = None,
    unique_tokens: float | None = None, serve_requests_per_day: float | None = None,
    serve_prompt_tokens: int = 512, serve_completion_tokens: int = 256, serve_latency_ms: float | None = None,
    horizon_days: float | None = None, hardware: str | None = None, seq_len: int = 2048,
    vocab_size: int = 32768, precision: str = "bf16", vision_images: float | None = None,
    vision_config: str | None = None, vision_text_tokens: int = DEFAULT_TEXT_TOKENS,
    vision_tower_images: float | None = None, vision_readout_outputs: int | None = None,
) -> dict:
    """The whole plan as a JSON-ready dict (see module doc); plan_cmd prints it."""
    vision = load_vision_config(vision_config) if vision_images is not None else None
    scaling = _load_law(law)
    hw = get_profile(gpu or "H100", hardware)
    bud = compute_budget(budget, hw, gpus, days, dollars, mfu, precision)
    warnings: list[str] = []
    result: dict = {
        "law": {**scaling.params(), "source": scaling.source, "n_counts": scaling.n_counts,
                "bootstrap_samples": len(scaling.samples)},
        "hardware": hw.to_dict(), "mfu": bud.mfu, "precision": precision, "seq_len": seq_len,
        "budget": {"flops": bud.flops, "source": bud.source},
    }
    serving = None
    demand = serve_requests_per_day is not None and serve_requests_per_day > 0
    if demand and gpus is not None and bud.source == "gpus×days":
        # Split a fixed pool: serving takes whole devices for the period, training the rest. The
        # served model is the one being planned, whose size depends on the training compute left,
        # so iterate; the reserved count only grows, which guarantees termination.
        def attempt(n_serve: int):
            C = (gpus - n_serve) * days * SECONDS_PER_DAY * bud.effective_flops_per_s
            tr = _train_plan(scaling, C, bud, gpus - n_serve, vocab_size, seq_len)
            est = serving_estimate(tr["_cfg"], hw, serve_requests_per_day, serve_prompt_tokens,
                                   serve_completion_tokens, serve_latency_ms, bud.mfu, precision)
            return tr, est

        # Serving the planned model needs need(n) devices when n are reserved; need(n) does not
        # grow with n (fewer training devices, smaller model), so the least n with need(n) ≤ n
        # is found by bisection over 0..gpus-1.
        lo, hi = 0, gpus - 1
        if serving_devices(attempt(hi)[1]) > hi:
            raise SpudError(f"serving {serve_requests_per_day:g} requests/day needs all {gpus} "
                            f"{hw.name} devices; nothing is left for training")
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if serving_devices(attempt(mid)[1]) <= mid else (mid + 1, hi)
        n_serve = lo
        train, serving = attempt(n_serve)
        result["split"] = {"pool": gpus, "serving_devices": n_serve, "training_devices": gpus - n_serve}
    else:
        train = _train_plan(scaling, bud.flops, bud, gpus, vocab_size, seq_len)
        if demand:
            serving = serving_estimate(train["_cfg"], hw, serve_requests_per_day, serve_prompt_tokens,
                                       serve_completion_tokens, serve_latency_ms, bud.mfu, precision)
    if vision is not None:  # what adding an image path to the planned model costs (vision_plan.py)
        result["vision"] = vision_stage(
            train["_cfg"], vision, vision_images, train["parallelism"], seq_len, train["devices"],
            bud.effective_flops_per_s, hw.price_per_hour, hw.memory_bytes, precision, DEFAULT_OPTIMIZER,
            vision_text_tokens, vision_tower_images, vision_readout_outputs)
        if not result["vision"]["fits"]:
            warnings.append("the vision stages do not fit the training plan's layout "
                            f"({result['vision']['memory']['total'] / 1e9:.1f} GB per device)")
    train.pop("_cfg")  # the ModelConfig object itself is not JSON; its fields are in "config"
    result["train"] = train
    if serving is not None:
        n = serving_devices(serving)
        result["serving"] = {**serving.to_dict(), "devices": n,
                             "cost_per_day_usd": n * 24 * hw.price_per_hour}
        if serving.limited_by == "latency" and serving.batch == 1 and serve_latency_ms is not None \
                and serving.step_latency_ms > serve_latency_ms:
            warnings.append(f"latency target {serve_latency_ms} ms/token is not met even at batch 1 "
                            f"({serving.step_latency_ms:.1f} ms)")
        horizon = horizon_days or days or 365.0
        inference = serve_requests_per_day * (serve_prompt_tokens + serve_completion_tokens) * horizon
        ot = overtrain_scan(scaling, train["C"], inference)
        oname, ocfg = choose_config(ot.best["N"], vocab_size, seq_len, scaling.n_counts)
        result["overtrain"] = {**ot.to_dict(), "horizon_days": horizon, "config": config_fields(oname, ocfg)}
        result["overtrain"].pop("scan")
    if train["parallelism"]["strategy"] == "does not fit":
        warnings.append(f"{train['config']['name']} does not fit on {train['devices']} × {hw.name} even with "
                        "FSDP and activation checkpointing")
    if unique_tokens is not None and train["D_star"] > MAX_USEFUL_EPOCHS * unique_tokens:
        warnings.append(
            f"D* = {train['D_star']:.3g} tokens is {train['D_star'] / unique_tokens:.1f} epochs of the "
            f"{unique_tokens:.3g} unique tokens; beyond ~{MAX_USEFUL_EPOCHS} epochs repeated data is worth "
            "much less (Muennighoff et al. 2023): train a smaller model longer or find more data")
    result["warnings"] = warnings
    return result


# --------------------------------------------------------------------------------- printing
def _fmt_days(d: float) -> str:
    return f"{d * 24:.1f} h" if d < 1 else f"{d:.1f} days"


def plan_cmd(
    budget: float | None = None, gpu: str | None = None, gpus: int | None = None, days: float | None = None,
    dollars: float | None = None, law: str | None = None, mfu: float | None = None,
    unique_tokens: float | None = None, serve_requests_per_day: float | None = None,
    serve_prompt_tokens: int = 512, serve_completion_tokens: int = 256, serve_latency_ms: float | None = None,
    horizon_days: float | None = None, hardware: str | None = None, json: str | None = None,
    seq_len: int = 2048, vocab_size: int = 32768, precision: str = "bf16", vision_images: float | None = None,
    vision_config: str | None = None, vision_text_tokens: int = DEFAULT_TEXT_TOKENS,
    vision_tower_images: float | None = None, vision_readout_outputs: int | None = None,
) -> dict:
    """`spud plan ...`: print the plan as rich tables; write it as JSON when --json PATH is given."""
    from rich.table import Table

    from spud.ui import make_console

    res = plan(budget, gpu, gpus, days, dollars, law, mfu, unique_tokens, serve_requests_per_day,
               serve_prompt_tokens, serve_completion_tokens, serve_latency_ms, horizon_days, hardware,
               seq_len, vocab_size, precision, vision_images, vision_config, vision_text_tokens,
               vision_tower_images, vision_readout_outputs)
    console = make_console()
    tr, hw, lw = res["train"], res["hardware"], res["law"]
    t = Table(title=f"training plan · {hw['name']} · MFU {res['mfu']:.0%} · {res['precision']}", show_header=False)
    t.add_column(style="bold")
    t.add_column()
    t.add_row("law", f"E={lw['E']:.3g} A={lw['A']:.4g} B={lw['B']:.4g} α={lw['alpha']:.3g} β={lw['beta']:.3g} "
                     f"({lw['source']}; N = {lw['n_counts']} params)")
    t.add_row("compute budget", f"{res['budget']['flops']:.3g} FLOPs (from {res['budget']['source']})")
    if "split" in res:
        s = res["split"]
        t.add_row("pool split", f"{s['serving_devices']} serving + {s['training_devices']} training of {s['pool']}")
        t.add_row("training compute", f"{tr['C']:.3g} FLOPs")
    t.add_row("N* / D*", f"{tr['N_star']:.3g} params / {tr['D_star']:.3g} tokens ({tr['tokens_per_param']:.1f} tokens/param)")
    interval = tr["loss_interval"]
    t.add_row("predicted loss", f"{tr['loss']:.3f}" + (f" (95% CI {interval[0]:.3f}-{interval[1]:.3f})" if interval else ""))
    c = tr["config"]
    t.add_row("model", f"{c['name']}: d_model={c['d_model']} n_layers={c['n_layers']} n_heads={c['n_heads']} "
                       f"n_kv_heads={c['n_kv_heads']} mlp_hidden={c['mlp_hidden']} vocab={c['vocab_size']} "
                       f"seq={c['max_seq_len']}")
    t.add_row("params", f"{c['params_total']:,} total, {c['params_non_embedding']:,} non-embedding")
    t.add_row("wall-clock", f"{_fmt_days(tr['wall_clock_days'])} on {tr['devices']} × {hw['name']} "
                            f"({tr['device_hours']:,.0f} device-hours, exact FLOPs {tr['train_flops_exact']:.3g})")
    t.add_row("cost", f"${tr['cost_usd']:,.0f} at ${hw['price_per_hour']}/device-hour (assumed price)")
    p, mem = tr["parallelism"], tr["parallelism"]["memory"]
    t.add_row("memory / device", f"{mem['total'] / 1e9:.1f} GB of {hw['memory_gb']:.0f} GB (weights "
              f"{mem['weights'] / 1e9:.1f}, grads {mem['gradients'] / 1e9:.1f}, {OPTIMIZER_NAME} {mem['optimizer'] / 1e9:.1f}, "
              f"activations {mem['activations'] / 1e9:.1f})")
    t.add_row("parallelism", f"{p['strategy']}" + (f" degree {p['fsdp']}" if p["strategy"] == "FSDP" else "")
              + f" · {p['note']}")
    if "vision" in res:
        v, vm = res["vision"], res["vision"]["memory"]
        t.add_row("vision stages", f"{v['images']:.3g} images × {v['tokens_per_image']} image + {v['text_tokens']} text "
                                   f"tokens, tower stage {v['tower_images']:.3g} pictures "
                                   f"({v['tower_stage_flops']:.3g} FLOPs): {v['flops']:.3g} FLOPs "
                                   f"({v['flops'] / tr['train_flops_exact']:.1%} of pretraining), "
                                   f"{_fmt_days(v['wall_clock_days'])}, ${v['cost_usd']:,.0f}; tower "
                                   f"{v['vision_params']:,} params; {vm['total'] / 1e9:.1f} GB / device")
    console.print(t)
    if "serving" in res:
        sv = res["serving"]
        s = Table(title="serving", show_header=False)
        s.add_column(style="bold")
        s.add_column()
        s.add_row("demand", f"{sv['demand_prefill_tokens_per_s']:,.0f} prompt + {sv['demand_decode_tokens_per_s']:,.0f} "
                            "completion tokens/s (daily average)")
        s.add_row("per device", f"decode {sv['decode_tokens_per_s']:,.0f} tok/s at batch {sv['batch']} "
                                f"({sv['step_latency_ms']:.1f} ms/token, limited by {sv['limited_by']}), "
                                f"prefill {sv['prefill_tokens_per_s']:,.0f} tok/s, tensor-parallel {sv['tensor_parallel']}")
        s.add_row("devices", f"{sv['devices']} ({sv['devices_needed']:.2f} at average load) · "
                             f"${sv['cost_per_day_usd']:,.0f}/day")
        ot = res["overtrain"]
        b, ch = ot["best"], ot["chinchilla"]
        s.add_row("lifetime inference", f"{ot['inference_tokens']:.3g} tokens over {ot['horizon_days']:g} days")
        s.add_row("over-training", f"N={b['N']:.3g}, D={b['D']:.3g} ({b['tokens_per_param']:.0f} tokens/param) reaches "
                                   f"loss {ot['target_loss']:.3f} with {b['total_flops']:.3g} total FLOPs vs "
                                   f"{ch['total_flops']:.3g} at N* ({ot['saving']:.1%} saved; Sardana et al. 2024)")
        console.print(s)
    for w in res["warnings"]:
        console.print(f"[yellow]warning: {w}")
    if json:
        Path(json).parent.mkdir(parents=True, exist_ok=True)
        Path(json).write_text(_json.dumps(res, indent=2, default=float), encoding="utf-8")
        console.print(f"wrote {json}")
    return res
