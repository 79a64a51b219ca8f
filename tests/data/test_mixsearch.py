"""spud mix search on a tiny two-source mix: proxies, regression, search, outputs, resume, and the
proxies trained as independent worker jobs (--worker i/N) giving exactly the single-process result."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

from spud.cli import main
from spud.data.mixsearch import fit_and_rank, sample_mixtures

TINY = {"model": {"d_model": 32, "n_layers": 1, "n_heads": 2, "max_seq_len": 64},
        "train": {"micro_batch_size": 4, "lr": 0.003, "threads": 1, "sample_every": 0, "log_every": 1},
        "tokenizer": {"vocab_size": 320, "train_bytes": 100_000},
        "data": {"total_tokens": 40_000, "val_fraction": 0.1, "sources": [
            {"name": "math", "type": "builtin", "builtin": "arithmetic"},
            {"name": "story", "type": "builtin", "builtin": "reasoning"}]}}


def test_sampled_mixtures_include_natural_and_uniform():
    nat = np.array([0.7, 0.2, 0.1])
    m = sample_mixtures(nat, 50, 0)
    assert m.shape == (50, 3) and np.allclose(m.sum(1), 1) and (m > 0).all()
    assert np.allclose(m[0], nat) and np.allclose(m[1], 1 / 3)
    assert np.array_equal(m, sample_mixtures(nat, 50, 0))  # deterministic


def test_regression_ranks_a_known_response():
    rng = np.random.default_rng(0)
    x = rng.dirichlet([1, 1, 1], 64)
    y = 2.0 - x[:, 0] + 0.5 * x[:, 1] ** 2  # more of source 0 is better
    model, oof, rho = fit_and_rank(x, y, 0)
    assert rho > 0.8
    assert model.predict(np.array([[0.9, 0.05, 0.05]]))[0] < model.predict(np.array([[0.05, 0.9, 0.05]]))[0]


def _search_args(recipe, out, *extra):
    return ["mix", "search", str(recipe), "--target", "story", "--proxies", "8", "--proxy-flops", "2e9",
            "--out", str(out), *extra]


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """One single-process search (8 proxies), shared by the tests that read it."""
    tmp = tmp_path_factory.mktemp("mixsearch")
    recipe = tmp / "r.yaml"
    recipe.write_text(yaml.safe_dump(TINY))
    out = tmp / "mix"
    assert main(_search_args(recipe, out)) == 0
    return recipe, out


def test_mix_search_cli_end_to_end_and_resume(searched):
    recipe, out = searched
    rows = [json.loads(x) for x in (out / "proxies.jsonl").read_text().splitlines()]
    assert [r["proxy"] for r in rows] == list(range(8))
    assert all(r["steps"] == rows[0]["steps"] >= 1 for r in rows)  # equal FLOPs: same model, same steps
    res = json.loads((out / "mix.json").read_text())
    assert set(res["weights"]) == {"math", "story"} and abs(sum(res["weights"].values()) - 1) < 1e-3
    mixed = yaml.safe_load((out / "mix.yaml").read_text())
    assert [s["weight"] for s in mixed["data"]["sources"]] == [res["weights"]["math"], res["weights"]["story"]]
    for f in ("report.md", "predicted_vs_actual.png", "weights.png"):
        assert (out / f).is_file()
    before = (out / "proxies.jsonl").stat().st_mtime_ns
    assert main(_search_args(recipe, out)) == 0  # resumed: every proxy done, none retrained
    assert (out / "proxies.jsonl").stat().st_mtime_ns == before


def test_worker_jobs_started_together_equal_one_search(searched, tmp_path, capsys):
    """Two `--worker i/2` processes started at once on an empty DIR (they race for the shared
    natural build and tokenizer), then the fit alone: the same proxies and mix as one process."""
    recipe, single = searched
    out = tmp_path / "mix"
    env = {**os.environ, "RAYON_NUM_THREADS": "1"}
    jobs = [subprocess.Popen([sys.executable, "-m", "spud", *_search_args(recipe, out, "--worker", f"{i}/2")],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for i in range(2)]
    logs = [j.communicate(timeout=600)[0] for j in jobs]
    assert [j.returncode for j in jobs] == [0, 0], logs
    assert "proxies [0, 2, 4, 6] done" in logs[0] and "proxies [1, 3, 5, 7] done" in logs[1]
    assert not (out / "mix.json").exists()  # workers do not fit
    assert not list(out.glob("_natural.tmp-*"))  # the losing worker's private build is gone
    trained = {p: p.stat().st_mtime_ns for p in out.glob("proxies/p*/proxy.json")}
    assert len(trained) == 8
    assert main(_search_args(recipe, out)) == 0  # the fit: trains nothing
    assert {p: p.stat().st_mtime_ns for p in out.glob("proxies/p*/proxy.json")} == trained
    assert (out / "proxies.jsonl").read_text() == (single / "proxies.jsonl").read_text()
    assert json.loads((out / "mix.json").read_text()) == json.loads((single / "mix.json").read_text())


def test_worker_refuses_other_settings_in_the_same_dir(searched, capsys):
    recipe, out = searched
    args = _search_args(recipe, out, "--worker", "0/2")
    args[args.index("2e9")] = "4e9"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "another proxy_flops" in err and "search.json" in err
    faster = _search_args(recipe, out, "--worker", "0/2")
    faster.insert(3, "train.threads=2")  # how fast, not what, a proxy trains: not pinned
    assert main(faster) == 0
    assert "proxies [0, 2, 4, 6] done; every proxy is done" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--target", "nope"], "not a source"),
    (["--target", "story", "--proxies", "3"], "at least 8 proxies"),
    (["--target", "story", "--worker", "2/2"], "--worker 2/2: i must be in 0..N-1"),
    (["--target", "story", "--worker", "one"], "--worker 'one': expected i/N"),
])
def test_mix_search_bad_input(tmp_path, capsys, extra, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(TINY))
    base = ["mix", "search", str(recipe), "--proxy-flops", "2e9", "--out", str(tmp_path / "m")]
    assert main(base + extra) == 2
    assert message in capsys.readouterr().err
