"""Reward curves of `spud rl` runs: batch accuracy and reward per step, and the periodic pass@1.

    python benchmarks/rl_curves.py LABEL=RUN/rl [LABEL=DIR ...] --out docs/img/rl-curves.png

Reads each run's metrics.jsonl (`rl` and `rl_eval` rows) and draws, against the step: the batch's
mean reward and accuracy (a 5-step moving average over the raw points), the share of sampled
groups with equal rewards (no signal), and the periodic pass@1 (greedy, or sampled with
rl.eval_samples) of the split the run evaluated on, a star at the step a run with rl.keep_best handed on.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from spud.train.metrics import read_metrics  # noqa: E402


def smooth(xs: list[float], k: int = 5) -> list[float]:
    return [sum(xs[max(0, i - k + 1):i + 1]) / len(xs[max(0, i - k + 1):i + 1]) for i in range(len(xs))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", metavar="LABEL=DIR")
    ap.add_argument("--out", default="docs/img/rl-curves.png")
    args = ap.parse_args()
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for spec in args.runs:
        label, _, path = spec.partition("=")
        rows = read_metrics(Path(path) / "metrics.jsonl")
        steps = [r for r in rows if r["kind"] == "rl"]
        evals = [r for r in rows if r["kind"] == "rl_eval" and "pass@1" in r]
        x = [r["step"] for r in steps]
        line, = axes[0].plot(x, smooth([r["reward"] for r in steps]), label=label)
        axes[0].scatter(x, [r["reward"] for r in steps], s=4, alpha=0.3, color=line.get_color())
        axes[1].plot(x, smooth([r["accuracy"] for r in steps]), color=line.get_color(), label=label)
        axes[1].scatter(x, [r["accuracy"] for r in steps], s=4, alpha=0.3, color=line.get_color())
        if steps and "groups_sampled" in steps[0]:
            equal = [(r["groups_equal_all_wrong"] + r["groups_equal_all_right"]) / r["groups_sampled"] for r in steps]
            axes[2].plot(x, smooth(equal), color=line.get_color(), label=label)
        if evals:
            n = evals[-1].get("samples", 1)
            how = "greedy" if n == 1 else f"{n} samples"
            axes[3].plot([r["step"] for r in evals], [100 * r["pass@1"] for r in evals], "o-",
                         color=line.get_color(), label=f"{label} ({evals[-1].get('split', 'heldout')}, {how})")
            best = evals[-1].get("best_step")  # rl.keep_best: the step whose model was handed on
            if best is not None:
                axes[3].plot([best], [100 * next(r["pass@1"] for r in evals if r["step"] == best)], "*",
                             markersize=14, color=line.get_color())
    titles = ["mean reward (train batch)", "accuracy (train batch)", "groups with equal rewards (share)",
              "in-run pass@1, % (dev / held-out; *: handed on)"]
    for ax, t in zip(axes, titles):
        ax.set_title(t)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    axes[3].legend(fontsize=7)
    axes[0].legend(fontsize=7)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
