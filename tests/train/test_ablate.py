"""`spud ablate` as a user runs it: equal-FLOP step counts, shared data, reports and plot, no
retraining of finished runs, resume of an interrupted one, and clear errors before any work."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from tiny_recipe import TINY_OVERRIDES

from spud.cli import main
from spud.config import load_config
from spud.errors import SpudError
from spud.model.flops import flops_per_token
from spud.tokenizer import Tokenizer
from spud.train import ablate, ablate_variants
from spud.train.metrics import read_metrics

TINY = str(Path(__file__).parents[2] / "configs" / "tiny.yaml")
BASE = [o for o in TINY_OVERRIDES if not o.startswith(("train.max_steps", "train.eval_every",
                                                         "train.checkpoint_every"))]
BUDGET = 1.2e9  # 10 steps of the tiny swiglu model, 11 of relu2 (cheaper per token)
VARIANTS = ["swiglu", "relu2"]


def _docs(tmp: Path) -> Path:
    d = tmp / "manuals"
    d.mkdir()
    text = "\n\n".join(f"Section {i}. Programs should report errors clearly and name the file "
                       f"they could not read, so that users can fix problem number {i}." for i in range(60))
    (d / "guide.md").write_text(text, encoding="utf-8")
    (d / "page.html").write_text(f"<html><body><p>{text}</p></body></html>", encoding="utf-8")
    return d


def _args(out: Path, docs: Path) -> list[str]:
    return ["ablate", TINY, *BASE, "--vary", "model.mlp=" + ",".join(VARIANTS), "--flops", f"{BUDGET:g}",
            "--evals", "3", "--heldout", "stdlib_prose", "--heldout", f"docs={docs}",
            "--heldout-tokens", "3000", "--out", str(out)]


def _run_dir(out: Path, mlp: str) -> Path:
    return out / "runs" / f"mlp={mlp}" / f"flops{BUDGET:.3g}-seed0"


@pytest.fixture(scope="module")
def ablation(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ablate")
    docs, out = _docs(tmp), tmp / "out"
    assert main(_args(out, docs)) == 0
    return out, docs


def test_equal_flop_steps_files_and_scores(ablation):
    out, _ = ablation
    report = json.loads((out / "ablation.json").read_text())
    vocab = Tokenizer.load(out / "data" / "tokenizer.json").vocab_size
    runs = {r["variant"]: r for r in report["runs"]}
    assert set(runs) == {f"mlp={m}" for m in VARIANTS}
    steps = {}
    for mlp in VARIANTS:
        cfg = load_config(TINY, [*BASE, f"model.mlp={mlp}", f"model.vocab_size={(vocab + 63) // 64 * 64}"])
        fpt = flops_per_token(cfg.model, cfg.seq_len)["training"]
        tps = cfg.train.micro_batch_size * cfg.seq_len
        r = runs[f"mlp={mlp}"]
        steps[mlp] = math.floor(BUDGET / (fpt * tps))
        assert (r["steps"], r["flops_per_token"], r["tokens"]) == (steps[mlp], fpt, steps[mlp] * tps)
        assert BUDGET - fpt * tps < r["flops"] <= BUDGET
        trained = [m["step"] for m in read_metrics(Path(r["run_dir"]) / "metrics.jsonl") if m["kind"] == "train"]
        assert trained == list(range(1, steps[mlp] + 1))
        assert 0 < r["val_bpb"] < 10 and set(r["heldout"]) == {"stdlib_prose", "docs"}
        assert all(0 < h["bpb"] < 10 and h["tokens"] > 0 for h in r["heldout"].values())
        assert r["tokens_per_s"] > 0 and r["wall_s"] > 0 and len(r["load_avg"]) == 2
        assert (Path(r["run_dir"]) / "data").resolve() == (out / "data" / "data").resolve()  # shared
    assert steps["swiglu"] != steps["relu2"]  # equal FLOPs, not equal steps
    # The same held-out text for every variant: same token counts.
    assert runs["mlp=swiglu"]["heldout"]["docs"]["tokens"] == runs["mlp=relu2"]["heldout"]["docs"]["tokens"]
    md = (out / "ablation.md").read_text()
    assert "| mlp=swiglu |" in md and "| mlp=relu2 |" in md and "stdlib_prose bpb" in md
    assert "| docs | 2 files under" in md and "| 0 of " in md  # no 13-gram contamination
    assert (out / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (summary,) = [s for s in report["summary"] if s["variant"] == "mlp=relu2"]
    assert summary["val_bpb"] == runs["mlp=relu2"]["val_bpb"] and summary["val_bpb_std"] is None


def test_rerun_does_not_retrain(ablation, capsys):
    out, docs = ablation
    before = {m: (_run_dir(out, m) / "metrics.jsonl").stat().st_mtime_ns for m in VARIANTS}
    old = json.loads((out / "ablation.json").read_text())
    assert main(_args(out, docs)) == 0
    assert capsys.readouterr().out.count("finished earlier, not retrained") == 2
    assert before == {m: (_run_dir(out, m) / "metrics.jsonl").stat().st_mtime_ns for m in VARIANTS}
    new = json.loads((out / "ablation.json").read_text())
    assert [r["val_bpb"] for r in new["runs"]] == [r["val_bpb"] for r in old["runs"]]


def test_interrupted_run_resumes_exactly(ablation, tmp_path, monkeypatch):
    done, docs = ablation
    out = tmp_path / "out"
    shutil.copytree(done, out, symlinks=True)
    shutil.rmtree(_run_dir(out, "relu2"))  # swiglu stays finished; relu2 is trained again

    from spud.train.trainer import Trainer

    real_step = Trainer.train_step

    def dies_at_step_6(self, lr):  # like a crash: no graceful checkpoint (the last one is step 4)
        if self.step == 6 and self.cfg.model.mlp == "relu2":
            raise KeyboardInterrupt
        return real_step(self, lr)

    monkeypatch.setattr(Trainer, "train_step", dies_at_step_6)
    assert main(_args(out, docs)) == 130
    run = _run_dir(out, "relu2")
    assert not (run / ablate.RESULT).exists() and (run / "checkpoints").is_dir()
    monkeypatch.setattr(Trainer, "train_step", real_step)
    assert main(_args(out, docs)) == 0
    events = [m.get("event") for m in read_metrics(run / "metrics.jsonl") if m["kind"] == "event"]
    assert "resume" in events
    resumed = json.loads((run / ablate.RESULT).read_text())
    straight = json.loads((_run_dir(done, "relu2") / ablate.RESULT).read_text())
    assert resumed["val_bpb"] == straight["val_bpb"] and resumed["heldout"] == straight["heldout"]


def test_added_heldout_corpus_is_scored_without_retraining(ablation, tmp_path, capsys):
    done, docs = ablation
    out = tmp_path / "out"
    shutil.copytree(done, out, symlinks=True)
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "notes.txt").write_text("Another corpus of plain notes about reading files carefully. " * 40)
    before = {m: (_run_dir(out, m) / "metrics.jsonl").stat().st_mtime_ns for m in VARIANTS}
    assert main([*_args(out, docs)[:-2], "--heldout", f"extra={extra}", "--out", str(out)]) == 0
    assert capsys.readouterr().out.count("rescoring its final checkpoint") == 2
    assert before == {m: (_run_dir(out, m) / "metrics.jsonl").stat().st_mtime_ns for m in VARIANTS}
    old = {r["variant"]: r for r in json.loads((done / "ablation.json").read_text())["runs"]}
    for r in json.loads((out / "ablation.json").read_text())["runs"]:
        assert set(r["heldout"]) == {"stdlib_prose", "docs", "extra"} and r["heldout"]["extra"]["bpb"] > 0
        # The same weights give the same scores on the corpora scored before.
        assert r["heldout"]["docs"] == old[r["variant"]]["heldout"]["docs"]
        assert r["val_bpb"] == old[r["variant"]]["val_bpb"]


def test_rebuilt_shared_data_is_an_error(ablation, tmp_path, capsys):
    done, docs = ablation
    out = tmp_path / "out"
    shutil.copytree(done, out, symlinks=True)
    stamp = _run_dir(out, "relu2") / ablate.DATA_STAMP
    assert json.loads(stamp.read_text()) == [s["sha256"] for s in
                                             json.loads((out / "data" / "data" / "manifest.json").read_text())["shards"]]
    stamp.write_text(json.dumps(["0" * 64]))  # as if DIR/data had been rebuilt since
    assert main(_args(out, docs)) == 2
    assert "another build of the shared data" in capsys.readouterr().err


def test_changed_plan_for_a_trained_run_is_an_error(ablation, capsys):
    out, docs = ablation
    args = _args(out, docs)
    args.insert(2, "train.lr=0.001")  # same run directories, different config
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "different config" in err and "train.lr" in err


@pytest.mark.parametrize("extra, message", [
    (["--vary", "model.mpl=a,b"], "unknown key 'model.mpl' (did you mean 'mlp'?)"),
    (["--vary", "data.total_tokens=1000,2000"], "data.total_tokens cannot be varied"),
    (["--vary", "seed=1,2"], "seeds are set by --seeds"),
    (["--vary", "model.mlp=swiglu", "--flops", "1e5"], "too small for variant"),
    (["--vary", "model.mlp=swiglu", "--flops", "lots"], "'lots' is not a positive number"),
    (["--vary", "model.mlp=swiglu", "--flops=-1e12"], "is not a positive number"),
    (["--vary", "model.mlp"], "expected KEY=VALUE1,VALUE2"),
    ([], "give either --vary"),
    (["--vary", "model.mlp=swiglu", "--heldout", "nothing/here"], "does not exist"),
])
def test_errors_before_any_work(tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    args = ["ablate", TINY, *BASE, *extra, "--out", str(out)]
    if not any(a.startswith("--flops") for a in extra):
        args += ["--flops", "2e9"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_lr_sweep_and_variants_file_plan(tmp_path):
    tree = ablate.base_tree(TINY, BASE)
    lr = ablate_variants.parse_vary(["train.lr=1e-3,3e-3", "model.mlp=swiglu,relu2"])
    assert [v.name for v in lr] == ["lr=1e-3,mlp=swiglu", "lr=1e-3,mlp=relu2",
                                    "lr=3e-3,mlp=swiglu", "lr=3e-3,mlp=relu2"]
    specs = ablate.plan_runs(tree, lr, [2e9, 4e9], [0, 1], 448, tmp_path, evals=4)
    assert len(specs) == 4 * 2 * 2
    assert {s.cfg.train.lr for s in specs} == {1e-3, 3e-3}
    # The second budget runs the variants in reverse order (load drift does not favour one).
    assert [s.variant.name for s in specs if s.budget == 4e9][::2] == [v.name for v in lr][::-1]
    assert all(s.steps * s.tokens_per_step * s.flops_per_token <= s.budget for s in specs)
    f = tmp_path / "variants.yaml"
    f.write_text("baseline: {}\nwide-mlp:\n  model.mlp_hidden: 256\n  train: {lr: 0.002}\n")
    named = ablate_variants.load_variants_file(f)
    assert [(v.name, v.overrides) for v in named] == [
        ("baseline", {}), ("wide-mlp", {"model": {"mlp_hidden": 256}, "train": {"lr": 0.002}})]
    spec = ablate.plan_runs(tree, named[1:], [2e9], [0], 448, tmp_path, 4)[0]
    assert spec.cfg.model.mlp_hidden == 256 and spec.cfg.train.lr == 0.002
    f.write_text("bad:\n  tokenizer.vocab_size: 300\n")
    with pytest.raises(SpudError, match="tokenizer.vocab_size cannot be varied"):
        ablate_variants.load_variants_file(f)


def test_benchmark_flop_ratio_interpolates_in_log_flops():
    import importlib.util

    script = Path(__file__).parents[2] / "benchmarks" / "recipe_efficiency.py"
    spec = importlib.util.spec_from_file_location("recipe_efficiency", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    base = [(1.0, 3.0), (2.0, 2.5), (4.0, 2.0)]
    assert bench.flop_ratio(base, base)["ratio"] == pytest.approx(1.0)
    assert bench.flop_ratio(base, [(1.0, 2.5), (2.0, 2.0), (4.0, 1.6)])["ratio"] == pytest.approx(2.0)
    # 2.0 is 3/4 of the way from 2.6 to 1.8: reached at 4**0.75 FLOPs, a ratio of 4 / 4**0.75.
    assert bench.flop_ratio(base, [(1.0, 2.6), (4.0, 1.8)])["ratio"] == pytest.approx(4 ** 0.25)
    early = bench.flop_ratio(base, [(1.0, 1.9), (4.0, 1.5)])
    assert early["ratio"] is None and early["ratio_at_least"] == 4.0
    # Worse everywhere: the baseline reaches the candidate's final 2.6 at 2**0.8 FLOPs.
    worse = bench.flop_ratio(base, [(1.0, 3.2), (2.0, 2.9), (4.0, 2.6)])
    assert worse["ratio"] == pytest.approx(2 ** 0.8 / 4)


def test_contamination_check_finds_training_text_in_a_heldout_corpus(ablation, capsys):
    from rich.console import Console

    from spud.data.heldout import HeldoutCorpus
    from spud.eval.decontam import shard_documents
    from spud.train.ablate_score import contamination

    out, _ = ablation
    data = out / "data"
    training = [d for _, docs, _ in shard_documents(data, None) for d in docs]
    leaked = [d for d in training if len(d.split()) > 40][:5]
    clean = [("Entirely new words about zebras, violins and lighthouses that no source would ever "
              "put together in one long sentence like this one here today.")]
    corpus = HeldoutCorpus("leak", "training documents", leaked + clean)
    (info,) = contamination([corpus], data, Console())
    o = info["overlap_13gram"]
    assert (o["contaminated"], o["documents"], o["complete"]) == (5, 6, True)
    assert "not fully held out" in capsys.readouterr().out


def test_summary_is_mean_and_sample_std_over_seeds(tmp_path):
    from spud.train.ablate_report import markdown, summarise

    def run(variant, seed, val, held):
        return {"variant": variant, "overrides": {}, "budget": 1e9, "seed": seed, "params": 10,
                "non_embedding_params": 5, "flops_per_token": 60, "tokens_per_step": 8, "steps": 3,
                "tokens": 24, "flops": 1440, "val_bpb": val, "heldout": {"h": {"bpb": held}},
                "wall_s": 2.0, "train_s": 1.0, "tokens_per_s": 24.0, "step_time_ms": 300.0, "curve": []}

    report = {"budgets": [1e9], "variants": [{"name": "a"}, {"name": "b"}],
              "runs": [run("a", 0, 1.0, 2.0), run("a", 1, 1.2, 2.4), run("b", 0, 0.9, 2.1), run("b", 1, 0.9, 2.1)]}
    rows = {r["variant"]: r for r in summarise(report)}
    assert rows["a"]["val_bpb"] == pytest.approx(1.1) and rows["a"]["val_bpb_std"] == pytest.approx(0.1414, abs=1e-4)
    assert rows["a"]["heldout"]["h"] == pytest.approx({"bpb": 2.2, "bpb_std": 0.2828}, abs=1e-4)
    assert rows["b"]["val_bpb_std"] == 0.0 and rows["b"]["seeds"] == 2
    report.update(summary=list(rows.values()), base="b.yaml", base_overrides=[], seeds=[0, 1],
                  machine={"cpus": 2, "load_start": [1.0], "load_end": [1.5]},
                  heldout=[{"name": "h", "origin": "x", "documents": 1, "bytes": 9,
                            "overlap_13gram": {"n": 13, "documents": 1, "contaminated": 0, "rate": 0.0,
                                               "complete": True}}])
    md = markdown(report)
    assert "| a | 10 | 60 | 3 | 24 | 1.1000 ± 0.1414 | **2.2000 ± 0.2828** |" not in md  # b is best on h
    assert "| a | 10 | 60 | 3 | 24 | 1.1000 ± 0.1414 | 2.2000 ± 0.2828 | 2 s | 24 | - |" in md
    assert "| b | 10 | 60 | 3 | 24 | **0.9000 ± 0.0000** | **2.1000 ± 0.0000** |" in md


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["ablate", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "usage: spud ablate" in out
    for flag in ("--vary", "--variants", "--flops", "--seeds", "--heldout", "--out"):
        assert flag in out


def test_benchmark_set_overrides_reach_the_candidate_too():
    """--set must apply to both recipes: the candidate's whole train section would otherwise
    replace e.g. train.threads=1 given for the baseline."""
    import importlib.util

    from spud.config import load_config

    script = Path(__file__).parents[2] / "benchmarks" / "recipe_efficiency.py"
    spec = importlib.util.spec_from_file_location("recipe_efficiency", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    configs = Path(__file__).parents[2] / "configs"
    base = load_config(configs / "baseline.yaml", ["train.threads=1"])
    variant, _ = bench.candidate_variant(str(configs / "demo.yaml"), base, ["train.threads=1"])
    assert variant.overrides["train"]["threads"] == 1
    assert variant.overrides["train"]["optimizer"] == "muon" and variant.overrides["model"]["qk_norm"] is True


def test_heldout_bpb_benchmark_rescores_a_run_as_the_ablation_did(ablation, tmp_path):
    """benchmarks/heldout_bpb.py scores any run's checkpoint with the ablation's scorer: on an
    ablation run's final checkpoint it must reproduce the figures the ablation recorded."""
    import importlib.util

    out, docs = ablation
    script = Path(__file__).parents[2] / "benchmarks" / "heldout_bpb.py"
    spec = importlib.util.spec_from_file_location("heldout_bpb", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    run = _run_dir(out, "relu2")
    recorded = json.loads((run / "ablation_run.json").read_text())
    res = tmp_path / "hb.json"
    assert bench.main([str(run), "--heldout", f"docs={docs}", "--heldout-tokens", "3000",
                       "--out", str(res)]) == 0
    (row,) = json.loads(res.read_text())["rows"]
    assert row["val_bpb"] == pytest.approx(recorded["val_bpb"], abs=1e-9)
    assert row["docs_bpb"] == pytest.approx(recorded["heldout"]["docs"]["bpb"], abs=1e-9)
