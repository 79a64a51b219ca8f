"""`spud report RUN`: report.md with PNG plots, on a real tiny run and on runs missing parts."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from spud.eval.report import write_report

OVERRIDES = [
    "data.total_tokens=40000", "tokenizer.vocab_size=400", "tokenizer.train_bytes=150000",
    "train.max_steps=3", "train.eval_every=3", "train.checkpoint_every=3", "train.eval_batches=1",
    "train.micro_batch_size=4", "model.max_seq_len=64",
]


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory) -> Path:
    from rich.console import Console

    from spud.config import load_config
    from spud.eval import run_eval
    from spud.train.trainer import Trainer

    cfg = load_config(Path(__file__).parents[2] / "configs" / "tiny.yaml", OVERRIDES)
    run = tmp_path_factory.mktemp("report") / "run"
    Trainer(cfg, run, console=Console(quiet=True)).run()
    run_eval(str(run), "mc_arithmetic", limit=5, device="cpu", intrinsic_source_tokens=500,
             console=Console(quiet=True), progress=False)
    return run


def images(md: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)


def test_report_on_trained_and_evaluated_run(evaluated_run):
    path = write_report(evaluated_run)
    assert path == evaluated_run / "report.md"
    md = path.read_text(encoding="utf-8")
    start = next(json.loads(line) for line in (evaluated_run / "metrics.jsonl").read_text().splitlines()
                 if '"start"' in line)
    assert f"{start['params']:,}" in md  # params in the facts table
    res = json.loads((evaluated_run / "eval" / "base-step_0000003" / "results.json").read_text())
    mc = res["tasks"]["mc_arithmetic"]
    # the row names the model and the checkpoint it measures, with the saved figures
    assert (f"| base | `step_0000003` | mc_arithmetic | acc | {mc['value']:.4g} | {mc['stderr']:.4g} | 0.25 |"
            in md)
    pngs = images(md)
    assert {"report/loss.png", "report/bpb.png", "report/lr.png", "report/throughput.png",
            "report/eval.png", "report/data_mix.png"} <= set(pngs)
    for rel in pngs:
        f = evaluated_run / rel
        assert f.is_file() and f.stat().st_size > 1000
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for word in ("tokenizer vocab", "FLOPs/token", "tokens seen", "wall time", "device",
                 "stdlib_docs", "arithmetic", "Last samples"):
        assert word in md


def test_report_without_val_eval_manifest_or_samples(evaluated_run, tmp_path):
    run = tmp_path / "bare"
    run.mkdir()
    shutil.copy(evaluated_run / "config.yaml", run / "config.yaml")
    kept = [line for line in (evaluated_run / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["kind"] in ("train", "event")]
    (run / "metrics.jsonl").write_text("\n".join(kept) + "\n{\"kind\": \"tra")  # torn last line
    md = write_report(run).read_text()
    assert "No evaluations yet" in md
    assert "No validation records" in md
    assert "No data/manifest.json" in md
    assert "No samples recorded" in md
    assert all((run / p).is_file() for p in images(md))
    assert "report/loss.png" in images(md)  # train loss alone still gets its plot


def test_report_on_empty_and_missing_run(tmp_path):
    from spud.errors import SpudError

    md = write_report(tmp_path).read_text()
    assert "has not started training" in md and not images(md)
    with pytest.raises(SpudError, match="not found"):
        write_report(tmp_path / "nope")


def test_report_rows_name_their_model_and_old_results_say_unknown(evaluated_run, tmp_path):
    """Results written before spud recorded the model (RUN/eval/<checkpoint>/) are not guessed
    to be base or chat; a chat result of the same step gets its own row."""
    run = tmp_path / "run"
    shutil.copytree(evaluated_run, run)
    res = json.loads((run / "eval" / "base-step_0000003" / "results.json").read_text())
    old = {k: v for k, v in res.items() if k not in ("model", "step")} | {"checkpoint": "step_0000003"}
    (run / "eval" / "step_0000003").mkdir()
    (run / "eval" / "step_0000003" / "results.json").write_text(json.dumps(old))
    chat = res | {"model": "chat", "checkpoint": str(run / "chat" / "checkpoints" / "step_0000003"), "chat": True}
    chat["tasks"] = {"mc_arithmetic": res["tasks"]["mc_arithmetic"] | {"value": 0.875}}
    (run / "eval" / "chat-step_0000003").mkdir()
    (run / "eval" / "chat-step_0000003" / "results.json").write_text(json.dumps(chat))
    md = write_report(run).read_text()
    assert "| chat | `step_0000003` | mc_arithmetic | acc | 0.875 |" in md
    assert "| base | `step_0000003` | mc_arithmetic | acc |" in md
    assert "| unknown | `step_0000003` | mc_arithmetic | acc |" in md
    assert "chat model, `step_0000003` (fewshot 0, limit 5, chat prompts)" in md


def test_report_data_section_cleaning_rates_and_mix_search(tmp_path):
    """A real build with planted junk and duplicates: the card lists per-source bytes/documents,
    each removal reason with its count, share of records and bytes, and the mix search's plot."""
    import random

    from spud.config import validate_config
    from spud.data.build import build_dataset

    words = ("the miller counts sacks of grain that farmers bring with carts before market opens in "
             "town where children play near river and bakers sell bread to travellers").split()
    rng = random.Random(0)
    pages = [" ".join(rng.choice(words) for _ in range(90)).capitalize() + "." for _ in range(20)]
    docs = pages + [pages[2].upper(), "too short"]  # 1 exact duplicate, 1 page under the word minimum
    web = tmp_path / "web.jsonl"
    web.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    cfg = validate_config({"data": {"sources": [{"name": "web", "type": "jsonl", "path": str(web),
                                                 "clean": {"kind": "text"}}],
                                    "total_tokens": 12000, "val_fraction": 0.0, "dedup": {"exact": True}},
                           "tokenizer": {"vocab_size": 300, "train_bytes": 50_000}})
    run = tmp_path / "run"
    manifest = build_dataset(cfg, run, progress=False, log=lambda *_: None)
    (run / "mix").mkdir()
    (run / "mix" / "mix.json").write_text(json.dumps({
        "targets": ["web"], "proxies": 8, "regressor": "lightgbm", "cv_spearman": 0.61,
        "weights": {"web": 1.0}, "natural": {"web": 1.0}}))
    (run / "mix" / "predicted_vs_actual.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 2000)
    md = write_report(run).read_text(encoding="utf-8")
    web_report = manifest["sources"][0]
    records = web_report["records"]
    assert records == 22
    assert f"| web | duplicate:exact | 1 | {1 / records:.1%} | {len(pages[2].upper()) / 1e6:.2f} |" in md
    assert f"| web | quality:n_words | 1 | {1 / records:.1%} | {len('too short') / 1e6:.2f} |" in md
    assert f"| web | 1 | 100.0% | {web_report['epochs']:.4g} | 20 | {web_report['bytes'] / 1e6:.2f} |" in md
    assert "dedup: exact;" in md and "0.61" in md
    assert "report/mix_predicted_vs_actual.png" in images(md)
    assert (run / "report" / "mix_predicted_vs_actual.png").is_file()
