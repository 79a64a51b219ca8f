"""Multiple-choice scoring throughput: spud's native scorer vs lm-evaluation-harness through the
spud adapter, same model object, same examples, same process.

The examples are the built-in `mc_arithmetic` task (zero-shot). For lm-eval they are written to
a local JSONL file with a task YAML whose prompt and choices are the same strings
(`target_delimiter: ""`, choices keep their leading space), so both sides score the same texts.
Three ways are timed, alternating round by round so load drift on a shared machine hits all of
them alike; the median round is reported:

- native-before:   the scorer `spud eval` used before the batched scorer, kept here verbatim as
                   `_per_example_logprobs`: one forward per example over its choices, full
                   (rows, width, vocab) log-softmax;
- native:          spud.eval.runner.eval_mc_many over all examples (spud.eval.batch_scorer:
                   length-sorted, token-budget batches, LM head on scored positions only), what
                   `spud eval` does now;
- adapter:         SpudLM.loglikelihood over all (context, choice) requests at once (lm-eval's
                   request format, batched longest first, batch_size rows per forward);
- lm-eval:         lm_eval.simple_evaluate(model=SpudLM(...)) end to end: task building from the
                   YAML (dataset from the local cache after the first round), requests, scoring,
                   metrics (bootstrap_iters=0: stderr of a mean is closed-form anyway).

    python benchmarks/eval_throughput.py [--run RUN] [--examples 200] [--rounds 5]

Without --run, a tiny run is trained first (configs/tiny.yaml, a few steps) in a temp dir.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default=None, help="run directory (default: train a tiny one)")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--examples", type=int, default=200, help="mc_arithmetic examples per round")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per method (alternating)")
    p.add_argument("--batch-size", type=int, default=16, help="adapter rows per forward")
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/eval_throughput.json"))
    return p.parse_args(argv)


def load_avg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def train_tiny(workdir: Path) -> Path:
    from rich.console import Console

    from spud.config import load_config
    from spud.train.trainer import Trainer

    cfg = load_config(ROOT / "configs/tiny.yaml", [
        "train.max_steps=10", "train.eval_every=10", "train.checkpoint_every=10",
        "train.eval_batches=1", "train.sample_prompts=[]", "data.total_tokens=60000",
        "tokenizer.vocab_size=400", "tokenizer.train_bytes=150000"])
    run = workdir / "run"
    Trainer(cfg, run, console=Console(quiet=True)).run()
    return run


def write_lm_eval_task(examples, dirpath: Path, name: str) -> None:
    data = dirpath / f"{name}.jsonl"
    with data.open("w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps({"prompt": ex.prompt, "choices": ex.choices, "label": ex.label}) + "\n")
    (dirpath / f"{name}.yaml").write_text(
        f"task: {name}\n"
        f"dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        f"test_split: test\n"
        f"output_type: multiple_choice\n"
        f"doc_to_text: prompt\n"
        f"doc_to_choice: choices\n"
        f"doc_to_target: label\n"
        f"target_delimiter: \"\"\n"
        f"metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n",
        encoding="utf-8")


@torch.no_grad()
def _per_example_logprobs(model, context, continuations, pad_id=0) -> list[float]:
    """The pre-batching native scorer (spud.eval.scoring.choice_logprobs up to d455f7a), the
    "before" of this benchmark."""
    max_len = model.cfg.max_seq_len
    rows, spans = [], []
    for cont in continuations:
        cont = list(cont)[-(max_len - 1):]
        ctx = list(context)[-(max_len - len(cont)):] if len(context) + len(cont) > max_len else list(context)
        if not ctx:
            ctx, cont = cont[:1], cont[1:]
        rows.append(ctx + cont)
        spans.append((len(ctx), len(cont)))
    width = max(len(r) for r in rows)
    x = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        x[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    logp = torch.log_softmax(model(x).float(), dim=-1)
    out = []
    for i, (start, n) in enumerate(spans):
        pos = torch.arange(start - 1, start - 1 + n)
        out.append(float(logp[i, pos, x[i, start:start + n]].sum()) if n else 0.0)
    return out


class _Req:
    def __init__(self, *args):
        self.args = args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)

    import lm_eval
    from lm_eval.tasks import TaskManager

    from spud.eval.builtin_tasks import make_task
    from spud.eval.lm_eval_adapter import SpudLM
    from spud.eval.runner import eval_mc_many, render_prompt
    from spud.runs import load_model

    load_before = load_avg()
    work = Path(tempfile.mkdtemp(prefix="spud-evalbench-"))
    os.environ["HF_DATASETS_CACHE"] = str(work / "hf_cache")
    run = Path(args.run) if args.run else train_tiny(work)
    model, tok, cfg, ckpt = load_model(run, args.checkpoint, "cpu", model="base")
    task = make_task("mc_arithmetic", 0)
    examples = (task.examples * (args.examples // len(task.examples) + 1))[:args.examples]
    n = len(examples)
    name = "spud_bench_mc"
    write_lm_eval_task(examples, work, name)
    lm = SpudLM(model=model, tokenizer=tok, batch_size=args.batch_size)
    tm = TaskManager(include_path=str(work), include_defaults=False)
    requests = [_Req(ex.prompt, c) for ex in examples for c in ex.choices]

    def native_before() -> float:
        ok = 0
        for ex in examples:
            ctx = render_prompt(task, ex, [], tok, False)
            scores = _per_example_logprobs(model, ctx, [tok.encode(c) for c in ex.choices], tok.pad_id)
            ok += max(range(len(scores)), key=scores.__getitem__) == ex.label
        return ok / n

    def native() -> float:
        ctxs = [render_prompt(task, ex, [], tok, False) for ex in examples]
        return sum(r["correct"] for r in eval_mc_many(model, tok, task, examples, ctxs, False)) / n

    def adapter() -> float:
        scores = [s for s, _ in lm.loglikelihood(requests, disable_tqdm=True)]
        ok = 0
        for i, ex in enumerate(examples):
            row = scores[i * len(ex.choices):(i + 1) * len(ex.choices)]
            ok += max(range(len(row)), key=row.__getitem__) == ex.label
        return ok / n

    def harness() -> float:
        res = lm_eval.simple_evaluate(model=lm, tasks=[name], task_manager=tm, log_samples=False,
                                      bootstrap_iters=0, verbosity="ERROR")
        return res["results"][name]["acc,none"]

    methods = {"native-before": native_before, "native": native, "adapter": adapter, "lm-eval": harness}
    acc = {k: f() for k, f in methods.items()}  # warm-up round (and dataset cache), untimed
    times: dict[str, list[float]] = {k: [] for k in methods}
    for _ in range(args.rounds):
        for k, f in methods.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    load_after = load_avg()

    rows = {}
    for k, ts in times.items():
        med = statistics.median(ts)
        rows[k] = {"median_s": round(med, 4), "examples_per_s": round(n / med, 2),
                   "rounds_s": [round(t, 4) for t in ts], "acc": acc[k]}
    base = rows["native-before"]["examples_per_s"]
    for r in rows.values():
        r["vs_native_before"] = round(r["examples_per_s"] / base, 3)

    print(f"mc_arithmetic, {n} examples x {len(examples[0].choices)} choices, zero-shot, "
          f"{args.rounds} alternating rounds (median); model {sum(p.numel() for p in model.parameters()):,} "
          f"params, ctx {cfg.model.max_seq_len}; torch threads {torch.get_num_threads()}; "
          f"load avg before {load_before} after {load_after}")
    print(f"{'method':<14} {'examples/s':>11} {'median s':>9} {'x before':>9} {'acc':>7}")
    for k, r in rows.items():
        print(f"{k:<14} {r['examples_per_s']:>11.1f} {r['median_s']:>9.3f} {r['vs_native_before']:>9.2f} "
              f"{r['acc']:>7.3f}")
    print(f"native (batched) vs adapter: {rows['native']['examples_per_s'] / rows['adapter']['examples_per_s']:.2f}x")

    result = {
        "benchmark": "eval_throughput", "task": "mc_arithmetic", "examples": n,
        "choices": len(examples[0].choices), "rounds": args.rounds,
        "adapter_batch_size": args.batch_size, "run": str(run), "checkpoint": Path(ckpt).name,
        "params": sum(p.numel() for p in model.parameters()), "max_seq_len": cfg.model.max_seq_len,
        "device": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__,
        "lm_eval": lm_eval.__version__, "python": platform.python_version(),
        "machine": platform.machine(), "load_avg_before": load_before, "load_avg_after": load_after,
        "results": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
