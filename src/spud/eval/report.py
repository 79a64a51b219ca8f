"""`spud report RUN`: one Markdown page about a run, with PNG plots next to it.

Reads only files the other stages write — metrics.jsonl (train/val/sample/event records),
config.yaml, tokenizer.json, data/manifest.json, checkpoints/, eval/<model>-<checkpoint>/results.json —
and writes RUN/report.md plus RUN/report/*.png. Every part is optional: a run without val
records, evaluations or a manifest gets a note in that section instead of a plot, so the report
works on a run that is still training or that crashed.

Plots use matplotlib's object API (Figure + Agg canvas), never pyplot, so no global backend is
switched and no display is needed. Reading: report_inputs.py; plots: report_plots.py; the data
section: report_data.py.
"""

from __future__ import annotations

import json
from pathlib import Path

from spud.eval.report_inputs import (
    _num,
    _read_config,
    _read_json,
    _vocab_size,
    _wall_seconds,
    load_evals,
)
from spud.eval.report_plots import (
    _series,
    plot_bpb,
    plot_evals,
    plot_loss,
    plot_lr,
    plot_throughput,
)
from spud.train.metrics import read_metrics

LAST_SAMPLES = 5


# ------------------------------------------------------------------------------- markdown
def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if v != 0 and (abs(v) >= 1e6 or abs(v) < 1e-3):
            return f"{v:.3g}"
        return f"{v:.{digits}g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return str(v)


def _duration(s: float | None) -> str:
    if s is None:
        return "—"
    h, rem = divmod(round(s), 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h {m:02d}m {sec:02d}s" if h else (f"{m}m {sec:02d}s" if m else f"{s:.1f}s")


def _cell(s) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def _printable(text: str) -> str:
    """Control characters (an undertrained model emits any byte) shown as escapes."""
    return "".join(c if c in "\n\t" or c.isprintable() else f"\\x{ord(c):02x}" if ord(c) < 256
                   else f"\\u{ord(c):04x}" for c in text)


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in r) + " |" for r in rows]
    return lines


def _img(name: str | None, alt: str, missing: str) -> list[str]:
    return [f"![{alt}](report/{name})", ""] if name else [f"_{missing}_", ""]


def write_report(run_dir: str | Path, samples: int = LAST_SAMPLES) -> Path:
    """Write RUN/report.md and RUN/report/*.png; → the path of report.md.
    Raises SpudError when RUN is not a directory; anything missing inside is noted, not fatal."""
    from spud.errors import SpudError

    run = Path(run_dir)
    if not run.is_dir():
        raise SpudError(f"run directory not found: {run}")
    out = run / "report"
    out.mkdir(exist_ok=True)
    for old in out.glob("*.png"):  # a plot that no longer applies must not linger
        old.unlink()

    rows = read_metrics(run / "metrics.jsonl")
    train = [r for r in rows if r.get("kind") == "train"]
    val = [r for r in rows if r.get("kind") == "val"]
    sample_rows = [r for r in rows if r.get("kind") == "sample"]
    events = [r for r in rows if r.get("kind") == "event"]
    start = next((r for r in reversed(events) if r.get("event") == "start"), {})
    cfg = _read_config(run)
    model_cfg = cfg.get("model") or {}
    manifest = _read_json(run / "data" / "manifest.json")
    evals = load_evals(run)
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("step_*") if p.is_dir())

    md = [f"# Run report: {run.resolve().name}", "", f"Run directory: `{run}`", ""]

    # ---- facts
    tokens_seen = _num(train[-1].get("tokens")) if train else None
    last_val = val[-1] if val else {}
    arch = ", ".join(f"{k}={model_cfg[k]}" for k in ("block", "d_model", "n_layers", "n_heads",
                                                      "n_kv_heads", "mlp", "max_seq_len")
                     if model_cfg.get(k) is not None) or None
    facts = [
        ("parameters", start.get("params")),
        ("non-embedding parameters", start.get("non_embedding_params")),
        ("FLOPs/token (training)", start.get("flops_per_token")),
        ("model", arch),
        ("tokenizer vocab", _vocab_size(run, cfg)),
        ("tokens/step", start.get("tokens_per_step")),
        ("steps", max((r.get("step", 0) for r in train), default=None)),
        ("tokens seen", int(tokens_seen) if tokens_seen is not None else None),
        ("wall time", _duration(_wall_seconds(rows))),
        ("device", start.get("device")),
        ("threads", start.get("threads")),
        ("device peak FLOP/s", start.get("peak_flops")),
        ("last val loss / bpb", f"{_fmt(_num(last_val.get('loss')))} / {_fmt(_num(last_val.get('bpb')))}"
         f" (step {last_val.get('step')})" if last_val else None),
        ("checkpoints", ", ".join(ckpts) if ckpts else None),
    ]
    md += ["## Model and run", ""]
    md += _table(["fact", "value"], [[k, _fmt(v)] for k, v in facts])
    if not rows:
        md += ["", "_No metrics.jsonl records: the run has not started training._"]
    md.append("")

    # ---- curves
    md += ["## Loss", ""]
    md += _img(plot_loss(train, val, out), "loss", "No train or val loss recorded yet.")
    md += ["## Validation bits per byte", ""]
    md += _img(plot_bpb(train, val, out), "val bpb",
               "No validation records (no val split, or no evaluation step reached yet).")
    md += ["## Learning rate", ""]
    md += _img(plot_lr(train, out), "learning rate", "No training steps recorded yet.")
    md += ["## Throughput", ""]
    md += _img(plot_throughput(train, out), "throughput", "No training steps recorded yet.")
    if train:
        tps = sorted(v for v in _series(train, "tokens_per_s")[1])
        mfu = sorted(v for v in _series(train, "mfu")[1])
        if tps:
            md += [f"Median {_fmt(tps[len(tps) // 2])} tokens/s"
                   + (f", MFU {mfu[len(mfu) // 2] * 100:.2f}%" if mfu else "") + ".", ""]

    md += _eval_section(evals, out)

    # ---- data: the mix, cleaning, a mixture search (spud.eval.report_data)
    from spud.eval.report_data import data_section

    md += data_section(run, manifest, out)

    # ---- samples
    md += ["## Last samples", ""]
    if not sample_rows:
        md += ["_No samples recorded (train.sample_prompts empty, or no sampling step reached)._", ""]
    for r in sample_rows[-samples:]:
        text = _printable(str(r.get("prompt", "")) + str(r.get("text", "")))
        fence = "````" if "```" in text else "```"
        md += [f"Step {r.get('step')}, prompt {json.dumps(r.get('prompt', ''), ensure_ascii=False)}:", "",
               fence + "text", text, fence, ""]

    path = run / "report.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(md).rstrip() + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def _eval_section(evals: list[dict], out: Path) -> list[str]:
    """Scores of the latest evaluated checkpoint of each model; every row names its model and
    checkpoint, so a base and a chat result can never be mistaken for each other."""
    md = ["## Evaluations", ""]
    if not evals:
        return md + [("_No evaluations yet: run `spud eval RUN --tasks ...` (results land in "
                      "RUN/eval/<model>-<checkpoint>/results.json)._"), ""]
    md += _img(plot_evals(evals, out), "scores over checkpoints", "No task scores in the results.")
    latest = {r["_model"]: r for r in evals}  # sorted by step within a model: the last one wins
    trows, aggs, irows = [], [], []
    for model, r in latest.items():
        ckpt = f"`{Path(str(r.get('checkpoint', r['_name']))).name}`"
        setting = ", ".join(f"{k} {r[k]}" for k in ("fewshot", "limit") if k in r)
        if r.get("chat"):
            setting += ", chat prompts" + (" (forced)" if r.get("forced") else "")
        for name, t in (r.get("tasks") or {}).items():
            if isinstance(t, dict):
                c = t.get("contamination")  # spud.eval.decontam: examples seen in training data
                seen = f"{c['contaminated']}/{c['examples']}" if isinstance(c, dict) and "examples" in c else "not checked"
                trows.append([model, ckpt, name, t.get("metric", "—"), _fmt(_num(t.get("value"))),
                              _fmt(_num(t.get("stderr"))), _fmt(_num(t.get("baseline"))),
                              _fmt(_num(t.get("centered"))), _fmt(t.get("n")), seen])
        agg = r.get("aggregate") or {}
        if _num(agg.get("centered_mean")) is not None:
            aggs.append(f"{model} model, {ckpt} ({setting}): centred mean over {agg.get('tasks')} tasks "
                        f"{agg['centered_mean']:+.4f}")
        intr = r.get("intrinsic") or {}
        named = [("val split", intr.get("val"))] + list((intr.get("sources") or {}).items())
        irows += [[model, ckpt, name, _fmt(_num(v.get("loss"))), _fmt(_num(v.get("bpb"))), _fmt(v.get("tokens"))]
                  for name, v in named if isinstance(v, dict) and "bpb" in v]
    if trows:
        md += _table(["model", "checkpoint", "task", "metric", "value", "± stderr", "chance", "centred", "n",
                      "contaminated"], trows) + [""]
        md += ["_contaminated: eval examples with a 13-gram (or, for generated arithmetic, a fact) that "
               "occurs in the data the model trained on (spud.eval.decontam)._", ""]
    md += [f"- {a}" for a in aggs] + ([""] if aggs else [])
    if irows:
        md += ["Intrinsic (same checkpoints):", ""]
        md += _table(["model", "checkpoint", "data", "loss", "bpb", "tokens"], irows) + [""]
    if len(evals) > 1:
        md += ["Evaluated: " + ", ".join(f"`{r['_name']}` ({r['_model']})" for r in evals), ""]
    return md


def report_command(run_dir: str, samples: int = LAST_SAMPLES) -> Path:
    """What `spud report RUN` runs: write the report, print where it is."""
    path = write_report(run_dir, samples)
    pngs = sorted((path.parent / "report").glob("*.png"))
    print(f"wrote {path} ({len(pngs)} plots in {path.parent / 'report'})")
    return path
