"""The RL target as one command: the recipe for a wall-clock budget, once per seed, then the gain.

    python benchmarks/rl_target.py runs/demo                                  # 5 seeds, 600 s, test split
    python benchmarks/rl_target.py runs/demo --seeds 1337 --split dev --set rl.lr=1e-4   # a dev trial
    python benchmarks/rl_target.py runs/demo --eval-only                      # measure the runs again

For each seed, `spud rl` with the recipe (RECIPE below: docs/rl.md, "The target") runs under
torchrun, alone on the machine, and is stopped at `--budget-s` seconds after its launch (start-up
and its own dev evaluations count) by SIGTERM to its ranks, which finish the step, save a
checkpoint and exit. `rl.steps` is set past what any budget reaches, so the clock, not a step
count, ends every run. Then the starting model (`--from`, the chat model) and every seed's RL
model are measured on the same problems (benchmarks/rl_gain.py's `measure`: greedy pass@1, and
unbiased pass@k from `--samples` completions at temperature 1), and the table gives each seed's
steps and gain over the starting model with the mean and standard deviation over seeds.

`--split heldout` (the default) is the test split: run it only for a declared measurement, and
choose settings with `--split dev`. The machine matters: how many steps fit in the budget, and
(docs/rl.md, "Faster steps, and another machine") even which chat model `make demo` makes, so
the JSON records the CPU, torch and the commit. Prints the table and writes JSON (default
benchmarks/results/rl_target.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rl_gain import measure  # noqa: E402

from spud.posttrain.rl_tasks import load_tasks  # noqa: E402
from spud.runs import default_serving_model, has_model  # noqa: E402
from spud.train.metrics import read_metrics  # noqa: E402

# The recipe: 16 prompts × 8 completions a step at rl.lr=2e-4 with the weight average, two gloo
# ranks of one thread each. 16 prompts (8 before 2026-12-05): on a machine that fits ~900 steps
# of 8 in the budget, half as many steps of twice the batch gained more on dev (docs/rl.md,
# "Twice the batch on a faster machine"); 2e-4 (1e-4 before) gained more on dev again, with far
# more spread between seeds ("A higher LR on the larger batch"). The model handed on is the average
# at its best in-run evaluation (400 dev problems of the run's own seed, 2 samples each, every 25
# steps; rl.keep_best), not the last step's ("The best evaluated model"). rl.steps only has to outlast
# the budget (the LR is constant after its warm-up, so it changes nothing else).
RECIPE = ["train.parallel=ddp", "train.threads=1", "rl.eval_split=dev", "rl.heldout_problems=400",
          "rl.eval_samples=2", "rl.eval_every=25", "rl.keep_best=true", "rl.checkpoint_every=10",
          "rl.prompts_per_step=16", "rl.lr=2e-4", "rl.ema_decay=0.98", "rl.steps=100000"]
GRACE_S = 120  # after SIGTERM: the step in flight, perhaps a dev evaluation, the checkpoint


def worker_pids(pid: int) -> list[int]:
    """The launcher's child processes (the ranks), from /proc; empty where /proc cannot tell."""
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (OSError, ValueError):
        return []


def log_excerpt(log: Path) -> str:
    """What went wrong, from a run's log: spud's own "error:" message (with its indented lines)
    where a rank printed one — torchrun's report that follows it names no cause — else the end."""
    lines = log.read_text(errors="replace").splitlines()
    for i, line in enumerate(lines):
        if line.startswith("error:"):
            j = i + 1
            while j < len(lines) and lines[j].startswith("  "):
                j += 1
            return "\n".join(lines[i:j])
    return "\n".join(lines)[-2000:]


def run_seed(args, seed: int, out: Path) -> dict:
    """One timed RL run; → what it did (steps, rollouts, wall seconds, how it ended)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           "-m", "spud", "rl", args.run, "--from", args.source, "--tasks", args.tasks, "--out", str(out),
           *RECIPE, f"seed={seed}", *args.set]
    log = out.parent / f"{out.name}.log"
    t0 = time.monotonic()
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        stopped = False
        try:
            p.wait(timeout=args.budget_s)
        except subprocess.TimeoutExpired:
            stopped = True
            # to the ranks themselves (each saves at its step's end); the launcher only if /proc
            # does not list them (torchrun then passes SIGTERM on)
            for pid in worker_pids(p.pid) or [p.pid]:
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            try:
                p.wait(timeout=GRACE_S)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    wall = time.monotonic() - t0
    metrics = out / "metrics.jsonl"
    rows = read_metrics(metrics) if metrics.is_file() else []
    steps = [r for r in rows if r["kind"] == "rl"]
    if not stopped and p.returncode != 0:  # it failed before the clock stopped it: no figure
        raise SystemExit(f"rl_target: seed {seed}: `spud rl` failed after {wall:.0f} s, before its "
                         f"{args.budget_s:.0f} s budget (exit code {p.returncode}); from {log}:\n{log_excerpt(log)}")
    if not steps or not (out / "checkpoints").is_dir():
        raise SystemExit(f"rl_target: seed {seed}: `spud rl` made no RL step and no checkpoint in {out} "
                         f"(exit code {p.returncode}); from {log}:\n{log_excerpt(log)}")
    return {"seed": seed, "out": str(out), "steps": steps[-1]["step"], "wall_s": round(wall, 1),
            "stopped_by_budget": stopped, "exit_code": p.returncode,
            "rollouts": sum(r["rollouts"] for r in steps),
            "s_per_step": round(sum(r["rollout_s"] + r["update_s"] for r in steps) / len(steps), 3),
            **handed_on(rows)}


def handed_on(rows: list[dict]) -> dict:
    """With rl.keep_best: the step whose model the run handed on (its best in-run evaluation)."""
    best = [r["best_step"] for r in rows if r["kind"] == "rl_eval" and r.get("best_step") is not None]
    return {"best_step": best[-1]} if best else {}


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:  # the first core's block: "AMD EPYC | family 23 | model 1"
        first = Path("/proc/cpuinfo").read_text().split("\n\n", 1)[0]
        fields = dict(line.split(":", 1) for line in first.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        cpu = " | ".join(x for x in (fields.get("model name", cpu), f"family {fields.get('cpu family', '?')}",
                                      f"model {fields.get('model', '?')}"))
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "commit": commit,
            "load_at_start": round(os.getloadavg()[0], 2), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def summarise(start: dict, rows: list[dict], target: float) -> dict:
    """Each RL row's gain over the starting model (points), and their mean and spread over seeds."""
    keys = [k for k in start if k == "greedy_pass@1" or k.startswith("sampled_pass@")]
    gains = {k: [100 * (r[k] - start[k]) for r in rows] for k in keys}
    out = {k: {"each": [round(g, 2) for g in v], "mean": round(statistics.mean(v), 2),
               "sd": round(statistics.stdev(v), 2) if len(v) > 1 else None} for k, v in gains.items()}
    main = "sampled_pass@1" if "sampled_pass@1" in out else "greedy_pass@1"
    out["target"] = {"metric": main, "points": target, "mean_gain": out[main]["mean"],
                     "met": out[main]["mean"] >= target}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a run with the model RL starts from (the chat model by default)")
    ap.add_argument("--seeds", default="1337,7,42,2,3")
    ap.add_argument("--budget-s", type=float, default=600.0, help="wall seconds per run, from its launch")
    ap.add_argument("--nproc", type=int, default=2, help="ranks (one thread each)")
    ap.add_argument("--from", dest="source", default="chat", choices=["chat", "base"])
    ap.add_argument("--tasks", default="arithmetic")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="an override on top of the recipe (repeatable)")
    ap.add_argument("--prefix", default="rl_target", help="run i writes RUN/<prefix>_<seed>")
    ap.add_argument("--eval-only", action="store_true", help="measure existing RUN/<prefix>_<seed> again")
    ap.add_argument("--split", choices=["heldout", "dev"], default="heldout")
    ap.add_argument("--problems", type=int, default=500)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--target", type=float, default=10.0, help="points of (sampled) pass@1 over the start")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for the measurement")
    ap.add_argument("--out", default="benchmarks/results/rl_target.json")
    args = ap.parse_args()
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"rl_target: --seeds must be integers separated by commas, not {args.seeds!r}") from None
    if not seeds:
        raise SystemExit("rl_target: --seeds names no seed")
    if not has_model(args.run, args.source):
        raise SystemExit(f"rl_target: {args.run} has no {args.source} model to start RL from")
    bad = [s for s in args.set if "=" not in s]
    if bad:
        raise SystemExit(f"rl_target: --set takes KEY=VALUE, not {bad[0]!r}")
    outs = {s: Path(args.run) / f"{args.prefix}_{s}" for s in seeds}
    if args.eval_only:
        missing = [str(o) for o in outs.values() if not (o / "checkpoints").is_dir()]
        if missing:
            raise SystemExit(f"rl_target: --eval-only, but no RL run in {', '.join(missing)}")
    else:
        there = [str(o) for o in outs.values() if o.exists()]
        if there:  # never overwrite a run: it may be the only copy of a measurement
            raise SystemExit(f"rl_target: {', '.join(there)} already exist; measure them with --eval-only, "
                             "or pick another --prefix")
    info = {"machine": machine(), "recipe": RECIPE + args.set, "budget_s": args.budget_s, "nproc": args.nproc,
            "source": args.source, "tasks": args.tasks}
    runs = []
    for s in seeds:
        if args.eval_only:
            metrics = outs[s] / "metrics.jsonl"
            runs.append({"seed": s, "out": str(outs[s]), **handed_on(read_metrics(metrics) if metrics.is_file() else [])})
            continue
        runs.append(run_seed(args, s, outs[s]))
        r = runs[-1]
        print(f"seed {s}: {r['steps']} steps in {r['wall_s']:.0f} s ({r['s_per_step']:.2f} s a step), "
              f"{r['rollouts']:,} rollouts → {r['out']}"
              + (f" (hands on step {r['best_step']})" if "best_step" in r else ""), flush=True)
    torch.set_num_threads(args.threads)
    _, problems, _ = load_tasks(args.tasks.split(","), 1, args.problems, 0, args.split)
    start = measure(args.source, args.run, args.source, problems, args.split, args.samples)
    rows = []
    for r in runs:
        rows.append(measure(f"rl seed {r['seed']}", r["out"], default_serving_model(r["out"]), problems,
                            args.split, args.samples))
        rows[-1].update({k: v for k, v in r.items() if k not in ("out",)})
    summary = summarise(start, rows, args.target)
    keys = [k for k in summary if k != "target"]
    print(f"\n{args.split} split, {start['n']} problems, {args.samples} samples at temperature 1; "
          f"{len(rows)} seed(s), {args.budget_s:.0f} s each; {info['machine']['cpu']}")
    print("| model | steps | " + " | ".join(keys) + " |\n|---|---:|" + "---:|" * len(keys))
    for r in [start] + rows:
        print(f"| {r['model']} | {r.get('steps', '')} | " + " | ".join(f"{100 * r[k]:.1f}" for k in keys) + " |")
    print("| gain, mean (sd) | | " + " | ".join(
        f"{summary[k]['mean']:+.1f}" + (f" ({summary[k]['sd']:.1f})" if summary[k]["sd"] is not None else "")
        for k in keys) + " |")
    t = summary["target"]
    print(f"\ntarget: +{t['points']:g} points of {t['metric']} on the mean: "
          + ("met" if t["met"] else f"missed by {t['points'] - t['mean_gain']:.1f}") + f" (mean gain {t['mean_gain']:+.1f})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({**info, "split": args.split, "problems": start["n"],
                                          "samples": args.samples, "start": start, "runs": rows,
                                          "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
