"""`run_eval`: load a checkpoint of RUN's base or chat model, run the requested tasks, write
results.json and per-example JSONL under RUN/eval/<model>-<checkpoint>/ (e.g. base-step_0000400,
chat-step_0000300: the two models never overwrite each other), print a table.

Which model is evaluated is always explicit (`model=`, default base) and recorded in the results,
and prompts must match it: chat-template prompts go to the chat model and plain prompts to the
base model, unless `force` says the mismatch is intended.

Scores per task kind:
- mc:   acc (argmax of summed log-likelihood) and acc_norm (log-likelihood per byte of the
        choice, which removes the bias towards short continuations);
- gen:  exact match after answer extraction (greedy), or pass@k from n samples;
- code: pass@1 and pass@k from n samples run against the task's tests in the sandbox.
The aggregate is the mean of the tasks' primary metric centred on their chance level.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from spud.errors import SpudError
from spud.eval import batch_scorer, decontam, math_norm, sandbox, scoring, vqa
from spud.eval.intrinsic import intrinsic_metrics
from spud.eval.tasks import Example, Task, load_tasks
from spud.model_kinds import CHAT_MODELS
from spud.runs import ModelChoice, choose_model, load_choice
from spud.ui import make_console


# ------------------------------------------------------------------------------------ prompts
def pick_shots(task: Task, k: int, seed: int, index: int) -> list[Example]:
    """The same k demonstrations for every example of a task (fixed seed); when they come from
    the evaluated examples themselves, the example being scored is never its own demonstration."""
    if k <= 0:
        return []
    pool = task.fewshot_pool if task.fewshot_pool else task.examples
    rng = random.Random(f"spud-eval/shots/{task.name}/{seed}")
    order = rng.sample(range(len(pool)), min(k + 1, len(pool)))
    if pool is task.examples:
        order = [j for j in order if j != index]
    return [pool[j] for j in order[:k]]


def render_prompt(task: Task, ex: Example, shots: list[Example], tok, chat: bool) -> list[int]:
    """Token ids of the context. Base models: plain text with demonstrations, starting with BOS
    (every training document does). Chat models: demonstrations as user/assistant turns."""
    if chat:
        msgs = []
        for s in shots:
            msgs += [{"role": "user", "content": s.prompt}, {"role": "assistant", "content": s.demo.strip()}]
        msgs.append({"role": "user", "content": ex.prompt})
        return tok.render_chat(msgs, add_generation_prompt=True)[0]
    text = "".join(s.prompt + s.demo + task.separator for s in shots) + ex.prompt
    return tok.encode(text, add_bos=True)


# -------------------------------------------------------------------------------- per kind
def eval_mc(model, tok, task, ex, ctx_ids, chat) -> dict:
    return eval_mc_many(model, tok, task, [ex], [ctx_ids], chat)[0]


def eval_mc_many(model, tok, task, examples, ctxs, chat) -> list[dict]:
    """Score every choice of every example in one call to the batched scorer (sorted by length,
    packed under a token budget), then read off each example's prediction."""
    conts = [[c.lstrip() if chat else c for c in ex.choices] for ex in examples]
    pairs = [(ctx, tok.encode(c)) for ctx, cs in zip(ctxs, conts) for c in cs]
    flat = [s.logprob for s in batch_scorer.score(model, pairs, pad_id=tok.pad_id)]
    rows, at = [], 0
    for ex, cs in zip(examples, conts):
        scores, at = flat[at:at + len(cs)], at + len(cs)
        nbytes = [max(len(c.encode("utf-8")), 1) for c in cs]
        pred = max(range(len(scores)), key=lambda i: scores[i])
        pred_norm = max(range(len(scores)), key=lambda i: scores[i] / nbytes[i])
        rows.append({"choices": ex.choices, "scores": scores, "pred": pred, "pred_norm": pred_norm,
                     "label": ex.label, "correct": pred == ex.label, "correct_norm": pred_norm == ex.label})
    return rows


def _samples(n: int, temperature: float) -> tuple[int, float]:
    return (1, 0.0) if temperature <= 0 else (n, temperature)


def generate_rows(model, tok, task, ctxs, n, temperature, seed) -> list[list[str]]:
    """n completions of each prompt in `ctxs`, all in one batch through the serving engine;
    sample i of every example has seed `seed + i` (as the per-example loop had)."""
    n, temperature = _samples(n, temperature)
    top_p = 0.95 if temperature > 0 else None
    prompts = [ctx for ctx in ctxs for _ in range(n)]
    params = [scoring.gen_params(task.max_new_tokens, task.stop, temperature, seed + i, top_p)
              for _ in ctxs for i in range(n)]
    outs = scoring.generate_texts(model, tok, prompts, params)
    return [outs[j * n:(j + 1) * n] for j in range(len(ctxs))]


def eval_gen(task, ex, outs: list[str], ks) -> dict:
    n = len(outs)
    extracted = [task.extract(o) for o in outs]
    ok = [task.is_correct(e, ex.target) for e in extracted]
    row = {"output": outs[0] if n == 1 else outs, "extracted": extracted[0] if n == 1 else extracted,
           "correct": ok[0] if n == 1 else sum(ok) / n}
    if n > 1:
        row["pass@k"] = {str(k): scoring.pass_at_k(n, sum(ok), k) for k in ks if k <= n}
    return row


def eval_code(task, ex, outs: list[str], ks) -> dict:
    n = len(outs)
    results = [sandbox.run_program(sandbox.check_program(ex.prompt, o, ex.test, ex.entry_point)) for o in outs]
    c = sum(r.passed for r in results)
    row = {"output": outs[0] if n == 1 else outs, "status": [r.status for r in results],
           "error": [r.stderr.strip().splitlines()[-1:] for r in results if not r.passed][:1],
           "correct": c / n if n > 1 else bool(c)}
    row["pass@k"] = {str(k): scoring.pass_at_k(n, c, k) for k in ks if k <= n}
    return row


# ------------------------------------------------------------------------------------ metrics
def task_metrics(task: Task, rows: list[dict], seconds: float, seed: int) -> dict:
    n = len(rows)
    out = {"kind": task.kind, "n": n, "seconds": round(seconds, 3), "baseline": task.baseline,
           "source": task.source}
    if task.answer == "math":  # which checker judged the answers ("math-verify" or "builtin")
        out["answer_checker"] = math_norm.math_checker()
    if task.kind == "mc":
        acc = sum(r["correct"] for r in rows) / n
        acc_norm = sum(r["correct_norm"] for r in rows) / n
        out["metrics"] = {"acc": acc, "acc_norm": acc_norm}
        out["metric"] = task.meta.get("primary", "acc")
    else:
        metrics = {}
        if "pass@k" in rows[0]:
            for k in rows[0]["pass@k"]:
                metrics[f"pass@{k}"] = sum(r["pass@k"][k] for r in rows) / n
        metrics.setdefault("pass@1", sum(float(r["correct"]) for r in rows) / n)
        if task.kind == "gen" and all(isinstance(r["correct"], bool) for r in rows):
            metrics = {"exact_match": metrics["pass@1"]} | {k: v for k, v in metrics.items() if k != "pass@1"}
        out["metrics"] = metrics
        out["metric"] = next(iter(metrics))
    value = out["metrics"][out["metric"]]
    per_example = [float(r["correct_norm"] if out["metric"] == "acc_norm" else r["correct"]) for r in rows]
    binary = all(v in (0.0, 1.0) for v in per_example)
    out["value"] = value
    out["stderr"] = (scoring.binomial_stderr(value, n) if binary
                     else scoring.bootstrap_stderr(per_example, seed))
    out["stderr_method"] = "binomial" if binary else "bootstrap"
    out["centered"] = scoring.centered(value, task.baseline)
    return out


# -------------------------------------------------------------------------------------- main
DEFAULT_KS = (1, 10)
MC_CHUNK = 512  # examples per batched scoring call: large batches, yet a live progress bar
GEN_CHUNK = 64  # generative examples per engine batch (× samples each)


def check_sampling(samples: int, temperature: float, ks: tuple[int, ...] | None) -> tuple[int, ...]:
    """Validate --samples/--temperature/--k together; → the pass@k values to report. Without
    explicit ks, the defaults (1, 10) that fit in `samples`."""
    if samples < 1:
        raise SpudError(f"--samples must be >= 1, got {samples}")
    if not temperature >= 0:  # also catches NaN
        raise SpudError(f"--temperature must be >= 0, got {temperature}")
    if samples > 1 and temperature == 0:
        raise SpudError(f"--samples {samples} needs --temperature > 0: greedy decoding gives the same "
                        "completion every time (e.g. --temperature 0.8)")
    if ks is None:
        return tuple(k for k in DEFAULT_KS if k <= samples)
    ks = tuple(int(k) for k in ks)
    bad = [k for k in ks if not 1 <= k <= samples]
    if not ks or bad:
        raise SpudError(f"--k {','.join(map(str, ks))}: every k must be between 1 and --samples ({samples}); "
                        f"pass@{bad[0] if bad else '?'} needs at least that many samples per example")
    return tuple(sorted(set(ks)))


def check_prompt_format(choice: ModelChoice, chat: bool, force: bool) -> None:
    """Chat-template prompts belong to the chat model, plain prompts to the base model: a
    mismatch measures the prompt format, not the model, so it needs `force`."""
    if force:
        return
    if chat and choice.model not in CHAT_MODELS:
        raise SpudError(
            f"--chat renders prompts with the chat template, but the {choice.model} model "
            f"({choice.checkpoint}) was not fine-tuned on it; evaluate the chat model with "
            "--model chat, drop --chat for plain prompts, or add --force to measure it anyway")
    if not chat and choice.model in CHAT_MODELS:
        raise SpudError(
            f"the {choice.model} model ({choice.checkpoint}) is being given plain, non-chat prompts; add --chat "
            "to use the chat template it was trained on, use --model base for the pretrained model, "
            "or add --force to measure it anyway")


def eval_dir(run_dir: str | Path, choice: ModelChoice) -> Path:
    """RUN/eval/<model>-<checkpoint>: names both, so base and chat results never collide."""
    return Path(run_dir) / "eval" / f"{choice.model}-{choice.checkpoint.name}"


def run_eval(
    run_dir: str, tasks: str, limit: int | None = None, fewshot: int = 0,
    checkpoint: str | None = None, device: str = "auto", seed: int = 0, *,
    model: str = "base", chat: bool = False, force: bool = False,
    samples: int = 1, temperature: float = 0.0, ks: tuple[int, ...] | None = None,
    intrinsic: bool = True, intrinsic_windows: int = 64, intrinsic_source_tokens: int = 20_000,
    decontam_tokens: int | None = decontam.DEFAULT_MAX_TOKENS,
    console=None, progress: bool = True,
) -> dict:
    """Evaluate RUN's `model` ("base" or "chat") at `checkpoint` on `tasks` (see spud.eval.tasks
    for the spec syntax). `chat` renders prompts with the chat template; `samples` completions
    per generative example at `temperature` give pass@k for each k in `ks`."""
    if limit is not None and limit < 1:
        raise SpudError(f"--limit must be >= 1, got {limit}")
    if fewshot < 0:
        raise SpudError(f"--fewshot must be >= 0, got {fewshot}")
    ks = check_sampling(samples, temperature, ks)
    if decontam_tokens is not None and decontam_tokens < 0:
        raise SpudError(f"--decontam-tokens must be >= 0 (0 = skip the check), got {decontam_tokens}")
    console = console or make_console()
    vqa_specs, tasks = vqa.split_specs(tasks)  # picture questions: spud.eval.vqa runs them
    task_list = load_tasks(tasks, seed) if tasks else []  # before the model: a bad spec fails fast
    choice = choose_model(run_dir, model, checkpoint)
    if task_list:  # the vqa tasks always use the chat template: the only way to show a picture
        check_prompt_format(choice, chat, force)
    console.print(f"evaluating the {choice.describe()}")
    net, tok, cfg = load_choice(choice, device)
    for t in task_list:
        if limit is not None:
            t.examples = t.examples[:limit]
        if not t.examples:
            raise SpudError(f"task {t.name} has no examples")
    out_dir = eval_dir(run_dir, choice)
    out_dir.mkdir(parents=True, exist_ok=True)

    results: dict = {"run": str(run_dir), "model": choice.model, "checkpoint": str(choice.checkpoint),
                     "step": choice.step, "device": str(device), "fewshot": fewshot, "limit": limit,
                     "seed": seed, "chat": chat, "forced": force, "samples": samples,
                     "temperature": temperature, "ks": list(ks), "tasks": {}}
    total = sum(len(t.examples) for t in task_list)
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=console, disable=not progress, transient=True) as bar:
        job = bar.add_task("eval", total=total)
        for task in task_list:
            bar.update(job, description=f"eval {task.name}")
            start = time.monotonic()
            rows = []
            if task.kind == "mc":  # batched: MC_CHUNK examples' choices per scorer call
                for lo in range(0, len(task.examples), MC_CHUNK):
                    chunk = task.examples[lo:lo + MC_CHUNK]
                    ctxs = [render_prompt(task, ex, pick_shots(task, fewshot, seed, lo + j), tok, chat)
                            for j, ex in enumerate(chunk)]
                    scored = eval_mc_many(net, tok, task, chunk, ctxs, chat)
                    for j, (ex, ctx, row) in enumerate(zip(chunk, ctxs, scored)):
                        rows.append({"index": lo + j, "where": ex.where, "prompt": tok.decode(ctx),
                                     "target": ex.target} | row)
                    bar.advance(job, len(chunk))
            examples = task.examples if task.kind != "mc" else []
            for lo in range(0, len(examples), GEN_CHUNK):  # batched through the engine
                chunk = examples[lo:lo + GEN_CHUNK]
                ctxs = [render_prompt(task, ex, pick_shots(task, fewshot, seed, lo + j), tok, chat)
                        for j, ex in enumerate(chunk)]
                outs = generate_rows(net, tok, task, ctxs, samples, temperature, seed)
                for j, (ex, ctx, o) in enumerate(zip(chunk, ctxs, outs)):
                    row = (eval_gen if task.kind == "gen" else eval_code)(task, ex, o, ks)
                    rows.append({"index": lo + j, "where": ex.where, "prompt": tok.decode(ctx),
                                 "target": ex.target} | row)
                bar.advance(job, len(chunk))
            results["tasks"][task.name] = task_metrics(task, rows, time.monotonic() - start, seed)
            _write_jsonl(out_dir / f"{_safe(task.name)}.jsonl", rows)
    if vqa_specs:
        with console.status("vqa: answering questions about the held-out pictures"):
            results["tasks"].update(vqa.run_vqa(net, tok, cfg, vqa_specs, limit, seed, out_dir, console))

    centred = [r["centered"] for r in results["tasks"].values()]
    results["aggregate"] = {"centered_mean": sum(centred) / len(centred), "tasks": len(centred),
                            "method": "mean over tasks of (value - baseline) / (1 - baseline)"}
    if decontam_tokens != 0 and task_list:  # held out means held out: scan what this model trained on
        with console.status("decontamination: scanning the training data for the eval examples"):
            report = decontam.check(decontam.task_probes(task_list), choice.run, max_tokens=decontam_tokens)
        for name, rates in report.pop("tasks").items():
            results["tasks"][name]["contamination"] = rates
        results["decontamination"] = report
    if intrinsic:
        with console.status("intrinsic: validation loss and bits per byte"):
            results["intrinsic"] = intrinsic_metrics(run_dir, net, tok, cfg, intrinsic_windows,
                                                     intrinsic_source_tokens)
    path = out_dir / "results.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2, default=_json_default), encoding="utf-8")
    tmp.replace(path)
    results["path"] = str(path)
    print_results(results, console)
    return results


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.@" else "_" for c in name)


def _json_default(o):
    return float(o) if hasattr(o, "__float__") else str(o)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False, default=_json_default) + "\n")


def print_results(results: dict, console) -> None:
    table = Table(title=f"eval {results['run']} · {results.get('model', '?')} model · {results['checkpoint']}")
    for col in ("task", "metric", "value", "± stderr", "chance", "centred", "n", "s"):
        table.add_column(col, justify="left" if col in ("task", "metric") else "right")
    for name, r in results["tasks"].items():
        table.add_row(name, r["metric"], f"{r['value']:.4f}", f"{r['stderr']:.4f}",
                      f"{r['baseline']:.3f}", f"{r['centered']:+.4f}", str(r["n"]), f"{r['seconds']:.1f}")
    agg = results["aggregate"]
    table.add_row("aggregate", "centred mean", "", "", "", f"{agg['centered_mean']:+.4f}",
                  str(agg["tasks"]), "", style="bold")
    console.print(table)
    intr = results.get("intrinsic")
    if intr:
        val = intr.get("val", {})
        if "bpb" in val:
            console.print(f"val loss {val['loss']:.4f} · bpb {val['bpb']:.4f} ({val['tokens']:,} tokens)")
        for name, s in (intr.get("sources") or {}).items():
            if isinstance(s, dict) and "bpb" in s:
                console.print(f"  {name}: loss {s['loss']:.4f} · bpb {s['bpb']:.4f} ({s['tokens']:,} tokens)")
            else:
                console.print(f"  {name}: {s.get('error') if isinstance(s, dict) else s}")
    if "decontamination" in results:
        rep = {**results["decontamination"],
               "tasks": {k: r["contamination"] for k, r in results["tasks"].items() if "contamination" in r}}
        console.print(f"decontamination: {decontam.summary_line(rep)}", soft_wrap=True, highlight=False)
    console.print(f"results: {results.get('path', '')}")
