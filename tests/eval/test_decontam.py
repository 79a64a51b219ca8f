"""Decontamination: planted overlaps are found with their exact counts (through real shards and
SFT files), and the built-in eval sets overlap none of the built-in training data."""

import itertools
import json
import re
from pathlib import Path

import pytest
import yaml

from spud.data.builtin import generated_documents
from spud.data.facts import canonical, extract_facts
from spud.eval.builtin_tasks import make_task
from spud.eval.decontam import Index, Probe, _Hits, check, summary_line, task_probes, words
from spud.posttrain import builtin_chat
from spud.posttrain.chat_eval import SPLITS, eval_items


def test_normalisation_and_short_examples():
    assert words("What's  31+88?\n") == ["what", "'", "s", "31", "+", "88", "?"]
    long = "the quick brown fox jumps over the lazy dog and then runs far away home"  # 15 words
    probes = [Probe("t", 0, long), Probe("t", 1, "17 + 25 = 42"), Probe("t", 2, "17 + 25 = 43")]
    index, hits = Index(probes), _Hits()
    # case, spacing and line breaks do not matter; 13 consecutive words are enough
    index.scan_ngrams(["x THE quick brown fox jumps over the lazy dog and\nthen runs far y"], "a", hits)
    # a short example counts only when it occurs whole (17 + 25 = 4 is not 17 + 25 = 42)
    index.scan_ngrams(["so 17 + 25 = 42 .", "17 + 25 = 4"], "b", hits)
    assert hits.ngram == {("t", 0), ("t", 1)}
    assert hits.where == {("t", 0): "a", ("t", 1): "b"}
    # 12 of the 13 words is not an overlap
    hits2 = _Hits()
    index.scan_ngrams(["quick brown fox jumps over the lazy dog and then runs far"], "c", hits2)
    assert hits2.ngram == set()


def test_fact_extraction_reads_words_symbols_and_verbs():
    text = ("Could you add thirty-one and eighty-eight? 88 + 31 = 119. Subtract 5 from 40. "
            "12 x 4 and 7 times 6; 3.5 + 2 is not a fact; 1,000 + 5 neither")
    assert extract_facts(text) == {("+", 31, 88), ("-", 40, 5), ("*", 4, 12), ("*", 6, 7)}
    assert canonical("+", 88, 31) == canonical("+", 31, 88) and canonical("-", 88, 31) == ("-", 88, 31)


def test_multi_step_facts_must_share_a_line():
    probes = [Probe("w", 0, "story one", frozenset({("*", 4, 12), ("+", 48, 97)})),
              Probe("w", 1, "story two", frozenset({("+", 48, 97)}))]
    index, hits = Index(probes), _Hits()
    index.scan_facts(["4 * 12 = 48.\n48 + 97 = 145.", "4 * 12 = 48."], "doc", hits, per_line=True)
    assert hits.facts == {("w", 1)}  # the single fact counts; the pair is on two lines
    index.scan_facts(["4 * 12 = 48.", "48 + 97 = 145."], "docs", hits, per_line=False)
    assert hits.facts == {("w", 1)}  # ... or in two texts
    index.scan_facts(["x", "12 * 4 = 48. 97 + 48 = 145."], "doc2", hits, per_line=True)
    assert hits.facts == {("w", 0), ("w", 1)}
    assert hits.where == {("w", 1): "doc", ("w", 0): "doc2"}


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    """A real run: a built-in source plus a JSONL source with planted eval text, built into
    shards; and a chat run whose SFT data is a planted JSONL file plus the built-in chats."""
    from rich.console import Console

    from spud.config import validate_config
    from spud.train.trainer import Trainer

    root = tmp_path_factory.mktemp("decontam")
    arith = make_task("arithmetic", 0).examples
    story = make_task("word_problems", 0).examples
    planted = [
        f"{arith[0].prompt} {arith[0].target}",           # verbatim: n-gram (short, whole) + fact
        f"Some notes. {story[0].prompt}{story[0].demo} More notes.",  # story with its steps: 13-gram + facts
        f"I wrote {arith[1].facts[0][1]} {arith[1].facts[0][0]} {arith[1].facts[0][2]} somewhere.",  # fact
    ]
    (root / "planted.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in planted))
    tiny = yaml.safe_load((Path(__file__).parents[2] / "configs" / "tiny.yaml").read_text())
    tiny["data"] = {"total_tokens": 40000, "sources": [
        {"name": "arith", "type": "builtin", "builtin": "arithmetic", "weight": 1},
        {"name": "planted", "type": "jsonl", "path": str(root / "planted.jsonl"), "weight": 1}]}
    tiny["tokenizer"] = {"vocab_size": 400, "train_bytes": 100000}
    tiny["train"].update(max_steps=1, eval_every=1, checkpoint_every=1, eval_batches=1, micro_batch_size=2)
    run = root / "run"
    Trainer(validate_config(tiny), run, console=Console(quiet=True)).run()  # real shards and a checkpoint
    chat = run / "chat"
    chat.mkdir()
    sft_file = root / "sft.jsonl"
    q = arith[2]
    sft_file.write_text(
        json.dumps({"messages": [{"role": "user", "content": q.prompt},
                                 {"role": "assistant", "content": q.target}]}) + "\n"
        + "not json\n"
        + json.dumps({"messages": [{"role": "user", "content": "hello"},
                                   {"role": "assistant", "content": "hi"}]}) + "\n")
    (chat / "config.yaml").write_text(yaml.safe_dump({"seed": 0, "sft": {
        "data": [str(sft_file), "builtin"], "builtin_conversations": 300,
        "base_run": str(run), "base_checkpoint": str(run / "checkpoints" / "step_0000001")}}))
    return run


def test_planted_overlaps_are_found_with_exact_counts(planted_run):
    arith, story = make_task("arithmetic", 0), make_task("word_problems", 0)
    arith.examples, story.examples = arith.examples[:100], story.examples[:50]
    probes = task_probes([arith, story])
    base = check(probes, planted_run)
    a, w = base["tasks"]["arithmetic"], base["tasks"]["word_problems"]
    # arithmetic: example 0 verbatim (n-gram and fact), example 1 as a bare fact; example 2 is
    # only in the SFT data, which the base model never saw
    assert (a["examples"], a["ngram"], a["facts"], a["contaminated"]) == (100, 1, 2, 2)
    assert [f["index"] for f in a["first"]] == [0, 1]
    assert a["rate"] == 0.02
    # the verbatim story: its 13-grams, and its two facts on one line
    assert (w["examples"], w["ngram"], w["facts"], w["contaminated"]) == (50, 1, 1, 1)
    assert base["complete"] and base["sources"]["pretraining"]["tokens"] == base["sources"]["pretraining"]["of_tokens"]
    assert "sft" not in base["sources"]

    chat = check(probes, planted_run / "chat")  # the chat model also trained on the SFT file
    a = chat["tasks"]["arithmetic"]
    assert (a["ngram"], a["facts"], a["contaminated"]) == (2, 3, 3)
    assert chat["sources"]["sft"]["conversations"] == 2 + 300  # the bad line is skipped, as spud sft does
    assert summary_line(chat).startswith("4 of 150 eval examples (2.7%) overlap the training data")


def test_spud_eval_reports_contamination_per_task(planted_run, capsys):
    from spud.cli import main

    assert main(["eval", str(planted_run), "--tasks", "arithmetic,word_problems", "--limit", "4",
                 "--seed", "0"]) == 0
    out = capsys.readouterr().out
    results = json.loads((planted_run / "eval" / "base-step_0000001" / "results.json").read_text())
    a, w = results["tasks"]["arithmetic"]["contamination"], results["tasks"]["word_problems"]["contamination"]
    assert (a["examples"], a["ngram"], a["facts"], a["contaminated"], a["rate"]) == (4, 1, 2, 2, 0.5)
    assert (w["examples"], w["contaminated"]) == (4, 1)
    assert results["decontamination"]["complete"] is True
    assert "decontamination: 3 of 8 eval examples (37.5%) overlap the training data" in out
    assert main(["report", str(planted_run)]) == 0  # the report card shows it per task
    card = (planted_run / "report.md").read_text()
    assert re.search(r"\| base \| `step_0000001` \| arithmetic \|[^\n]*\| 4 \| 2/4 \|", card), card
    assert re.search(r"\| word_problems \|[^\n]*\| 4 \| 1/4 \|", card)
    from spud.eval.runner import run_eval  # the check can be skipped (0 tokens)

    results = run_eval(str(planted_run), "arithmetic", limit=1, decontam_tokens=0, intrinsic=False,
                       progress=False)
    assert "decontamination" not in results and "contamination" not in results["tasks"]["arithmetic"]
    assert main(["eval", str(planted_run), "--decontam-tokens", "-1"]) != 0
    assert "--decontam-tokens must be >= 0" in capsys.readouterr().err


def test_partial_scan_says_so(planted_run):
    task = make_task("arithmetic", 0)
    task.examples = task.examples[:5]
    probes = task_probes([task])
    report = check(probes, planted_run, max_tokens=1)
    assert report["complete"] is False and "PARTIAL" in summary_line(report)


def test_builtin_eval_sets_overlap_no_builtin_training_data():
    """Every built-in eval set against a sample of every built-in training generator (pretraining
    arithmetic and reasoning documents, the SFT conversations): zero overlap of either kind."""
    probes = task_probes([make_task(name, 0) for name in ("arithmetic", "mc_arithmetic", "word_problems")])
    items = [it for split in SPLITS for it in eval_items(split, 100)]
    probes += [Probe(it.split, i, f"{it.question} {it.answer}", frozenset(it.facts)) for i, it in enumerate(items)]
    index, hits = Index(probes), _Hits()
    docs = [d for name in ("arithmetic", "reasoning") for d in itertools.islice(generated_documents(name, 1), 1500)]
    index.scan_ngrams(docs, "pretraining", hits)
    index.scan_facts(docs, "pretraining", hits, per_line=True)
    convs = ["\n".join(m["content"] for m in c) for c in builtin_chat.conversations(8000, 1337)]
    index.scan_ngrams(convs, "sft", hits)
    index.scan_facts(convs, "sft", hits, per_line=False)
    assert len(probes) == 500 + 500 + 250 + 500
    assert hits.ngram == set() and hits.facts == set(), sorted(hits.where.items())[:5]
    # the scan was not vacuous: the same index does find the training data's own facts
    train_fact = next(iter(extract_facts(convs[0]) or extract_facts(docs[0])))
    probe = Index([Probe("x", 0, "anything", frozenset({train_fact}))])
    seen = _Hits()
    probe.scan_facts(convs[:50] + docs[:5], "x", seen, per_line=False)
    assert seen.facts == {("x", 0)}
