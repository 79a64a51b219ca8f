"""The files `spud ablate` writes: ablation.json (every run + a per-variant summary), ablation.md
(tables) and ablation.png (validation bits/byte against training FLOPs for every variant)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def summarise(report: dict) -> list[dict]:
    """One row per (budget, variant): seed means (± sample std) of the scores, and the run facts."""
    rows = []
    for budget in report["budgets"]:
        for variant in report["variants"]:
            runs = [r for r in report["runs"] if r["budget"] == budget and r["variant"] == variant["name"]]
            if not runs:
                continue
            first = runs[0]
            row = {k: first[k] for k in ("variant", "overrides", "budget", "params", "non_embedding_params",
                                         "flops_per_token", "tokens_per_step", "steps", "tokens", "flops")}
            row["seeds"] = len(runs)
            row["val_bpb"], row["val_bpb_std"] = _mean_std([r.get("val_bpb") for r in runs])
            row["heldout"] = {}
            for name in first["heldout"]:
                mean, std = _mean_std([r["heldout"][name]["bpb"] for r in runs])
                row["heldout"][name] = {"bpb": mean, "bpb_std": std}
            for key in ("wall_s", "train_s", "tokens_per_s", "step_time_ms"):
                row[key] = _mean_std([r.get(key) for r in runs])[0]
            loads = [x for r in runs for x in r.get("load_avg") or []]
            row["load_avg"] = [min(loads), max(loads)] if loads else None
            rows.append(row)
    return rows


def _fmt(mean: float | None, std: float | None = None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.4f} ± {std:.4f}" if std is not None else f"{mean:.4f}"


def markdown(report: dict) -> str:
    rows = report["summary"]
    corpora = [c["name"] for c in report["heldout"]]
    machine = report["machine"]
    lines = ["# Ablation at equal training FLOPs", ""]
    if report.get("command"):
        lines += ["```", report["command"], "```", ""]
    base = f"Base recipe `{report['base']}`"
    if report["base_overrides"]:
        base += f" with {' '.join(report['base_overrides'])}"
    budgets = ", ".join(f"{b:.3g}" for b in report["budgets"])
    lines += [
        (f"{base}; seeds {', '.join(map(str, report['seeds']))}; budgets {budgets} training FLOPs. "
         "Steps = floor(budget / (FLOPs/token × tokens/step)), FLOPs/token from spud.model.flops."),
        (f"Machine: {machine['cpus']} CPUs; load average {machine['load_start'][0]:.1f} when this report's "
         f"command started, {machine['load_end'][0]:.1f} when it ended; the table gives each run's "
         "during its training (wall-clock and tokens/s depend on it)."), "",
        ("Scores are final bits per byte (lower is better; the best of each column in bold), mean ± "
         "sample std over seeds: `val` on the shared validation split, the others on held-out "
         "corpora no run trained on."), "",
    ]
    for budget in report["budgets"]:
        sub = [r for r in rows if r["budget"] == budget]
        best = {c: min((r["heldout"][c]["bpb"] for r in sub if r["heldout"][c]["bpb"] is not None),
                       default=None) for c in corpora}
        best_val = min((r["val_bpb"] for r in sub if r["val_bpb"] is not None), default=None)
        lines += [f"## {budget:.3g} FLOPs", "",
                  "| variant | params | FLOPs/token | steps | tokens | val bpb | "
                  + " | ".join(f"{c} bpb" for c in corpora) + " | wall-clock | tokens/s | load avg |",
                  "|---|---:|---:|---:|---:|---:|" + "---:|" * len(corpora) + "---:|---:|---:|"]
        for r in sub:
            cells = []
            for c in corpora:
                h = r["heldout"][c]
                text = _fmt(h["bpb"], h["bpb_std"])
                cells.append(f"**{text}**" if h["bpb"] is not None and h["bpb"] == best[c] else text)
            tps = f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else "-"
            load = f"{r['load_avg'][0]:.1f}–{r['load_avg'][1]:.1f}" if r.get("load_avg") else "-"
            val = _fmt(r["val_bpb"], r["val_bpb_std"])
            val = f"**{val}**" if r["val_bpb"] is not None and r["val_bpb"] == best_val else val
            lines.append(f"| {r['variant']} | {r['params']:,} | {r['flops_per_token']:,} | {r['steps']:,} | "
                         f"{r['tokens']:,} | {val} | "
                         + " | ".join(cells) + f" | {r['wall_s']:.0f} s | {tps} | {load} |")
        lines.append("")
    lines += ["## Held-out corpora", "",
              "| corpus | source | documents | bytes | documents sharing a 13-gram with the training data |",
              "|---|---|---:|---:|---:|"]
    for c in report["heldout"]:
        o = c["overlap_13gram"]
        partial = "" if o.get("complete", True) else " (partial scan)"
        lines.append(f"| {c['name']} | {c['origin']} | {c['documents']:,} | {c['bytes']:,} | "
                     f"{o['contaminated']:,} of {o['documents']:,} ({o['rate']:.1%}){partial} |")
    lines += ["", "![val bpb against training FLOPs](ablation.png)", ""]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, variant in enumerate(report["variants"]):
        color = colors[i % len(colors)]
        for j, budget in enumerate(report["budgets"]):
            runs = [r for r in report["runs"] if r["variant"] == variant["name"] and r["budget"] == budget]
            by_step: dict[int, list[tuple[float, float]]] = {}
            for r in runs:  # seeds share the step grid: average their curves
                for p in r["curve"]:
                    if p["bpb"] is not None and p["step"] > 0:
                        by_step.setdefault(p["step"], []).append((p["flops"], p["bpb"]))
            if not by_step:
                continue
            xs = [statistics.fmean(x for x, _ in v) for _, v in sorted(by_step.items())]
            ys = [statistics.fmean(y for _, y in v) for _, v in sorted(by_step.items())]
            ax.plot(xs, ys, color=color, marker="o", markersize=3,
                    label=variant["name"] if j == 0 else None)
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("validation bits per byte")
    ax.set_title("Validation bpb against training FLOPs (mean over seeds)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_reports(report: dict, out: Path) -> None:
    report["summary"] = summarise(report)
    (out / "ablation.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    (out / "ablation.md").write_text(markdown(report), encoding="utf-8")
    plot(report, out / "ablation.png")
