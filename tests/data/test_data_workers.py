"""Worker processes in `spud data build` (data.workers / --workers): the same dataset, byte for
byte, as a one-process build on a generated corpus with planted junk and duplicates; read-ahead
is bounded; bad values and dead workers are clear errors."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from data_helpers import make_cfg, quiet, what_was_built, page

from spud.cli import main
from spud.data.build import build_dataset
from spud.data.workers import CHUNK_RECORDS, IN_FLIGHT_PER_WORKER, PreparePool, resolve_workers
from spud.errors import SpudError

def corpus(tmp_path):
    """web/: 3 jsonl files with planted exact and near duplicates (also across files), junk the
    rules drop, a line of invalid JSON and blank lines; notes/: paragraphs; big.txt: one 1.2 MB
    document the build reads in pieces."""
    good = [page(i) for i in range(90)]
    junk = ["short page", "#tag " * 60, "\n".join(["same line repeated here and there"] * 12)]
    web = tmp_path / "web"
    web.mkdir()
    files = [good[0:30] + [junk[0], good[3].upper()],                               # exact dup
             good[30:60] + [junk[1], good[33] + " again", "{not json"],             # near dup
             good[60:90] + [junk[2], good[5], good[40].replace("miller", "baker", 1)]]
    for k, docs in enumerate(files):
        lines = [json.dumps({"text": t}) if not t.startswith("{") else t for t in docs]
        (web / f"f{k}.jsonl").write_text("\n".join(lines[:5]) + "\n\n" + "\n".join(lines[5:]) + "\n")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "n.txt").write_text("\n\n".join(page(500 + k, 40) for k in range(40)) + "\n")
    big = tmp_path / "big.txt"
    big.write_text("the the the the the the the the\n" * 40_000)  # few tokens per byte for its size
    assert big.stat().st_size > 1.1 * 2**20
    return web, notes, big


def cfg_for(paths, total_tokens: int, workers: int, weights=(1.0, 0.3, 0.2, 0.05)):
    web, notes, big = paths
    sources = [
        {"name": "web", "type": "jsonl", "path": str(web), "clean": {"kind": "text"}, "weight": weights[0]},
        {"name": "notes", "type": "text", "path": str(notes), "split": "blank_lines", "weight": weights[1],
         "clean": {"kind": "text", "rules": {"n_words": {"min": 20}}}},
        {"name": "big", "type": "text", "path": str(big), "weight": weights[2]},
        {"name": "math", "type": "builtin", "builtin": "arithmetic", "weight": weights[3]},
    ]
    return make_cfg(sources, dedup={"exact": True, "near": True, "threshold": 0.7, "ngram": 3},
                    val_fraction=0.1, total_tokens=total_tokens, shard_tokens=20_000, workers=workers,
                    max_bad_fraction=0.2)


def built(run) -> tuple[dict, dict]:
    manifest = json.loads((run / "data" / "manifest.json").read_text())
    files = {p.name: p.read_bytes() for p in sorted((run / "data").iterdir())}
    return manifest, files


# 12k: all but the generator are cut mid-pass, far before their input ends (what was read ahead
# must not be counted); 60k: web and notes repeat, re-read from disk on every pass (first-pass
# decisions replayed, tokens from the workers on every pass); 450k, mostly big.txt: its 1.2 MB
# document is read and tokenized in two pieces.
@pytest.mark.parametrize("total_tokens, weights", [(12_000, (1.0, 0.3, 0.2, 0.05)),
                                                   (60_000, (1.0, 0.3, 0.2, 0.05)),
                                                   (450_000, (0.3, 0.1, 8.0, 0.05))])
def test_two_workers_build_the_same_dataset_as_one_process(tmp_path, run_dir, total_tokens, weights,
                                                           monkeypatch):
    monkeypatch.setattr("spud.data.mix.REPEAT_CACHE_TOKENS", 0)
    paths = corpus(tmp_path)
    one = build_dataset(cfg_for(paths, total_tokens, 1, weights), run_dir, progress=False, log=quiet)
    two_dir = tmp_path / "two"
    two_dir.mkdir()
    shutil.copy(run_dir / "tokenizer.json", two_dir / "tokenizer.json")
    two = build_dataset(cfg_for(paths, total_tokens, 2, weights), two_dir, progress=False, log=quiet)
    assert one["workers"] == 1 and two["workers"] == 2
    assert 10 < two["peak_rss_mb"] < 4096 and 10 < two["workers_peak_rss_mb"] < 4096
    assert what_was_built(one) == what_was_built(two)
    m1, files1 = built(run_dir)
    m2, files2 = built(two_dir)
    assert what_was_built(m1) == what_was_built(m2)
    files1.pop("manifest.json"), files2.pop("manifest.json")
    assert files1 == files2  # every shard and inspect.json, byte for byte
    src = {s["name"]: s for s in two["sources"]}
    if total_tokens == 60_000:  # the whole web source was read: every planted item was found
        assert src["web"]["skipped"] == {"duplicate:exact": 2, "duplicate:near": 2, "quality:duplicate_lines": 1,
                                         "quality:n_words": 1, "quality:symbol_ratio": 1, "invalid_json": 1}
        assert src["web"]["blank_lines"] == 3 and src["web"]["epochs"] > 1
    elif total_tokens == 12_000:
        assert src["web"]["epochs"] < 0.6 and src["web"]["documents"] < 50  # not counted past the cut
    else:
        assert src["big"]["split_documents"] == 1 and src["big"]["epochs"] > 1


def test_cli_workers_flag_and_bad_values(tmp_path, tokenizer_file, capsys):
    recipe = tmp_path / "r.yaml"
    cfg = cfg_for(corpus(tmp_path), 10_000, workers=0).model_dump(mode="json")
    recipe.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(tokenizer_file, out / "tokenizer.json")
    assert main(["data", "build", str(recipe), "--out", str(out), "--no-progress", "--workers", "2"]) == 0
    assert json.loads((out / "data" / "manifest.json").read_text())["workers"] == 2
    capsys.readouterr()
    for bad in ("-1", "two", "1000"):
        assert main(["data", "build", str(recipe), "--out", str(out), "--workers", bad]) == 2
        err = capsys.readouterr().err
        assert "data.workers" in err and "Traceback" not in err


def test_automatic_worker_count():
    cores = min(os.cpu_count() or 1, 8)
    assert resolve_workers(0, cleaning=False, total_tokens=10**9) == 1  # the tokenizer has all cores already
    assert resolve_workers(0, cleaning=True, total_tokens=10_000) == 1  # too small to repay the start
    assert resolve_workers(0, cleaning=True, total_tokens=10**9) == cores
    assert resolve_workers(3, cleaning=False, total_tokens=10) == 3


def test_read_ahead_is_bounded(tokenizer):
    """A reader is never drained ahead of the build: at most the in-flight chunks, and with a
    small budget less than that."""
    pulled = [0]

    def read(stats):
        for i in range(100_000):
            pulled[0] += 1
            yield page(i % 50, 30), 0.0, f"doc{i}"

    pool = PreparePool(2, tokenizer, [])
    try:
        records = pool.records(0, read, None, False)
        next(records)
        assert pulled[0] <= IN_FLIGHT_PER_WORKER * 2 * CHUNK_RECORDS
        records.close()
        pulled[0] = 0
        small = pool.records(0, read, None, False, budget=lambda: 500)  # ~500 tokens still wanted
        text, _, _, prepared = next(small)
        assert pulled[0] < 200 and prepared.tokens[0][0] == tokenizer.bos_id
        small.close()
    finally:
        pool.close()


@pytest.mark.parametrize("scenario", ["feeding", "mid-send", "after-cut"])
def test_a_dead_worker_fails_the_build_and_the_process_still_exits(tokenizer_file, scenario):
    """A killed worker fails the build with a clear error, and terminate() leaves no thread for
    the interpreter to join at exit: the process exits (a subprocess, so that a regression fails
    this test instead of hanging the suite after its last test). See dead_worker_scenario.py."""
    script = Path(__file__).with_name("dead_worker_scenario.py")
    try:
        done = subprocess.run([sys.executable, str(script), str(tokenizer_file), scenario],
                              capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{scenario}: the process did not exit after the build failed; printed "
                    f"{e.stdout!r} {e.stderr!r}")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    assert "worker process died" in report["error"], report
    assert report == {"error": report["error"], "manager_alive": False, "threads_alive": [],
                      "workers_alive": 0}
    assert "Traceback" not in done.stderr, done.stderr  # no executor thread died with an error


def test_a_dead_worker_fails_the_wait_even_if_the_executor_never_notices(tokenizer, monkeypatch):
    """CPython 3.11's executor can deadlock when a worker dies while its feeder thread writes
    the call queue, so its own BrokenProcessPool never comes (this suite once hung there): the
    build's wait checks the workers itself."""
    import concurrent.futures
    import threading
    from concurrent.futures.process import BrokenProcessPool

    from spud.data import workers

    monkeypatch.setattr(workers, "WORKER_POLL_S", 0.05)
    pool = PreparePool(1, tokenizer, [])
    try:
        never = concurrent.futures.Future()  # a result the executor will never deliver
        dead = SimpleNamespace(exitcode=-9)
        monkeypatch.setattr(pool, "_workers", lambda: [SimpleNamespace(exitcode=None), dead])
        raised = []

        def wait():  # in a thread, so that a wait that never ends fails the test, not the suite
            try:
                pool._result(never)
            except BrokenProcessPool as e:
                raised.append(e)

        waiter = threading.Thread(target=wait, daemon=True)
        waiter.start()
        waiter.join(10)
        assert raised and "exited" in str(raised[0])
        done = concurrent.futures.Future()
        done.set_result("ok")
        dead.exitcode = None  # all alive: a finished job is simply returned
        assert pool._result(done) == "ok"
    finally:
        monkeypatch.undo()  # the real workers again, for terminate to kill
        pool.terminate()
