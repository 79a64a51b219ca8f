"""How many times fewer training FLOPs a candidate recipe needs to match the baseline recipe.

Trains configs/baseline.yaml (the frozen 2023-style recipe) and a candidate recipe in the same run
at several training-FLOP budgets (the order of the two alternates from budget to budget, so slow
drift in machine load does not favour one), every run on the baseline's data and tokenizer (built
once), with `spud ablate`'s machinery: steps = floor(budget / (FLOPs/token × tokens/step)). Both
are scored at the end of every budget on held-out text (docs/recipe.md): the built-in
`stdlib_prose` slice and, when installed, the Debian package gnu-standards.

The FLOP ratio: the baseline's final held-out bpb (at the largest budget) is the target; the
candidate's bpb-vs-FLOPs points are interpolated linearly in log-FLOPs to find where it reaches the
target, and ratio = baseline FLOPs / candidate FLOPs at equal bpb. When the candidate already beats
the target at the smallest budget the ratio is only bounded below (reported as ">= x"); when it
never reaches it the ratio is < 1 and found the other way round (where the baseline reaches the
candidate's final bpb). Also reported: the median wall-clock per optimizer step of each recipe.

    python benchmarks/recipe_efficiency.py [configs/demo.yaml] --budgets 2.5e12,5e12,1e13,2e13

The candidate's model and train sections are used whole (its field defaults included); its data
and tokenizer sections are ignored: both recipes train on the baseline's data.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GNU_STANDARDS = Path("/usr/share/doc/gnu-standards")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("candidate", nargs="?", default=str(REPO / "configs" / "demo.yaml"),
                   help="candidate recipe YAML (default configs/demo.yaml)")
    p.add_argument("--baseline", default=str(REPO / "configs" / "baseline.yaml"))
    p.add_argument("--budgets", default="2.5e12,5e12,1e13,2e13", help="training FLOPs per run, comma-separated")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--heldout", action="append", default=None,
                   help="held-out corpus (repeatable; default stdlib_prose, plus gnu-standards if installed)")
    p.add_argument("--heldout-tokens", type=int, default=32768)
    p.add_argument("--evals", type=int, default=4, help="validation points per run")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override applied to both recipes' base (e.g. data.total_tokens=3000000)")
    p.add_argument("--work", default=str(REPO / "runs" / "recipe_efficiency"),
                   help="directory for the shared data and the runs (resumable)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "recipe_efficiency.json"))
    return p.parse_args(argv)


def candidate_variant(path: str, baseline_cfg, overrides: list[str]):
    """The candidate as an ablation variant over the baseline: its whole model and train sections,
    with the same --set overrides the baseline gets (else e.g. train.threads would apply to one)."""
    from spud.config import load_config
    from spud.train.ablate_variants import Variant

    cand = load_config(path, overrides)
    notes = [f"candidate's {s} section differs from the baseline's and is ignored (same data for both)"
             for s in ("data", "tokenizer") if getattr(cand, s) != getattr(baseline_cfg, s)]
    train = cand.train.model_dump(mode="json")
    train.pop("max_steps")  # set by the budget
    return Variant("candidate", {"model": cand.model.model_dump(mode="json"), "train": train}), notes


def _crossing(points: list[tuple[float, float]], target: float) -> float | None:
    """log-linear interpolation: the FLOPs at which a decreasing bpb-vs-FLOPs curve reaches
    target, or None outside the measured range."""
    for (c0, b0), (c1, b1) in itertools.pairwise(points):
        if b0 > target >= b1:
            t = (b0 - target) / (b0 - b1)
            return math.exp(math.log(c0) + t * (math.log(c1) - math.log(c0)))
    return None


def flop_ratio(baseline: list[tuple[float, float]], candidate: list[tuple[float, float]]) -> dict:
    """points: (training FLOPs, bpb) per budget, sorted by FLOPs. Returns the ratio (baseline FLOPs
    ÷ candidate FLOPs at the baseline's final bpb) and how it was found."""
    c_final, target = baseline[-1]
    if candidate[0][1] <= target:
        bound = c_final / candidate[0][0]
        return {"ratio": None, "ratio_at_least": bound, "target_bpb": target,
                "note": f"candidate beats the baseline's final bpb already at its smallest budget: "
                        f"ratio >= {bound:.2f}; add smaller budgets to measure it"}
    hit = _crossing(candidate, target)
    if hit is not None:
        return {"ratio": c_final / hit, "target_bpb": target, "candidate_flops_at_target": hit,
                "note": "interpolated in log-FLOPs"}
    # Never reached: measure the other way round, where the baseline reaches the candidate's final.
    k_final, k_target = candidate[-1]
    back = _crossing(baseline, k_target)
    if back is not None:
        return {"ratio": back / k_final, "target_bpb": target,
                "note": "candidate never reached the baseline's final bpb (ratio < 1): measured where "
                        "the baseline reaches the candidate's final bpb"}
    return {"ratio": None, "ratio_at_most": baseline[0][0] / k_final, "target_bpb": target,
            "note": "candidate is worse than the baseline at every budget; out of range"}


def points(report: dict, variant: str, metric: str) -> list[tuple[float, float]]:
    """(actual training FLOPs, seed-mean bpb) per budget, for val ('val') or a held-out corpus."""
    out = []
    for row in report["summary"]:
        if row["variant"] == variant:
            bpb = row["val_bpb"] if metric == "val" else row["heldout"][metric]["bpb"]
            out.append((float(row["flops"]), bpb))
    return sorted(out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from spud.config import load_config
    from spud.train.ablate import run_ablation
    from spud.train.ablate_variants import Variant, parse_flops
    from spud.ui import make_console

    console = make_console()
    budgets = parse_flops(args.budgets)
    if len(budgets) < 2:
        raise SystemExit("give at least two --budgets to interpolate between")
    heldout = args.heldout
    if heldout is None:
        heldout = ["stdlib_prose"]
        if GNU_STANDARDS.is_dir():
            heldout.append(f"gnu={GNU_STANDARDS}")
        else:
            console.print(f"[yellow]{GNU_STANDARDS} not found (apt-get install gnu-standards): "
                          "scoring on stdlib_prose only")
    base_cfg = load_config(args.baseline, args.set)
    cand, notes = candidate_variant(args.candidate, base_cfg, args.set)
    for n in notes:
        console.print(f"[yellow]{n}")
    started = time.time()
    report = run_ablation(args.baseline, [Variant("baseline", {}), cand], budgets, args.work,
                          seeds=args.seeds, heldout=heldout, overrides=args.set, evals=args.evals,
                          heldout_tokens=args.heldout_tokens, console=console,
                          command="python " + " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]))
    metrics = [c["name"] for c in report["heldout"]] + ["val"]
    ratios = {m: flop_ratio(points(report, "baseline", m), points(report, "candidate", m)) for m in metrics}
    step_ms = {}
    for name in ("baseline", "candidate"):
        per_run = [r["step_time_ms"] for r in report["runs"] if r["variant"] == name and r["step_time_ms"]]
        step_ms[name] = statistics.median(per_run) if per_run else None

    from rich.table import Table

    table = Table(title=f"{Path(args.candidate).name} vs {Path(args.baseline).name}: bits/byte at equal FLOPs")
    table.add_column("FLOPs", justify="right")
    for m in metrics:
        table.add_column(f"{m} baseline", justify="right")
        table.add_column(f"{m} candidate", justify="right")
    for budget in budgets:
        rows = {r["variant"]: r for r in report["summary"] if r["budget"] == budget}
        cells = []
        for m in metrics:
            for v in ("baseline", "candidate"):
                r = rows[v]
                cells.append(f"{(r['val_bpb'] if m == 'val' else r['heldout'][m]['bpb']):.4f}")
        table.add_row(f"{budget:.3g}", *cells)
    console.print(table)
    for m, r in ratios.items():
        value = f"{r['ratio']:.2f}×" if r["ratio"] is not None else "out of range"
        console.print(f"FLOP ratio on {m}: [bold]{value}[/] ({r['note']})")
    if step_ms["baseline"] and step_ms["candidate"]:
        console.print(f"median step time: baseline {step_ms['baseline']:.0f} ms, candidate "
                      f"{step_ms['candidate']:.0f} ms ({step_ms['candidate'] / step_ms['baseline']:.2f}×)")
    result = {
        "baseline": args.baseline, "candidate": args.candidate, "budgets": budgets, "seeds": args.seeds,
        "overrides": args.set, "notes": notes, "flop_ratio": ratios, "step_time_ms": step_ms,
        "heldout": report["heldout"], "summary": report["summary"],
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), **report["machine"]},
        "wall_s": round(time.time() - started, 1), "work_dir": str(args.work),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1), encoding="utf-8")
    console.print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
