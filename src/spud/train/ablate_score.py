"""Scoring for `spud ablate`: final bits/byte of a trained model on the shared validation split and
on held-out corpora, the run's speed from its metrics.jsonl, and how much of each held-out corpus
the training data contains (13-gram overlap).

Every model of an ablation is scored on the same text: the val windows are evenly spaced over the
shared val shards, and each held-out corpus is tokenized once with the shared tokenizer and capped
at the same evenly spaced documents. Bits per byte (not loss per token) so that the figure means
the same for any tokenizer.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
import torch

from spud.data import heldout as heldout_mod
from spud.data.loader import TokenLoader
from spud.eval.intrinsic import _doc_windows, score_windows
from spud.train.metrics import read_metrics

MAX_BYTES_PER_TOKEN = 8  # bounds the text tokenized for a held-out token budget
SCORE_BATCH_TOKENS = 8192  # tokens per scoring forward: few calls for small models, bounded logits
_windows_cache: dict[tuple, np.ndarray] = {}


def heldout_windows(corpus, tok, seq_len: int, max_tokens: int) -> np.ndarray:
    """The corpus as (N, seq_len+1) windows of [BOS, doc...] streams with at most max_tokens
    targets, from documents evenly spaced through the whole corpus (not its first chapter)."""
    key = (corpus.name, corpus.nbytes, tok.sha256(), seq_len, max_tokens)
    if key not in _windows_cache:
        docs = heldout_mod.evenly_spaced(corpus.documents, max_tokens * MAX_BYTES_PER_TOKEN)
        encoded = [[tok.bos_id, *ids] for ids in tok.encode_batch(docs)]
        total = sum(len(e) for e in encoded)
        if total > max_tokens + 1:
            keep = max(1, round(len(encoded) * max_tokens / total))
            encoded = [encoded[int(i * len(encoded) / keep)] for i in range(keep)]
        stream = [t for e in encoded for t in e][:max_tokens + 1]
        _windows_cache[key] = _doc_windows(stream, seq_len)
    return _windows_cache[key]


@torch.no_grad()
def score_model(model, tok, cfg, run_dir: Path, corpora: list, val_windows: int,
                heldout_tokens: int) -> dict:
    """{'val_bpb', 'val_loss', 'val_tokens', 'heldout': {name: {'bpb', 'loss', 'tokens'}}}."""
    device = next(model.parameters()).device
    token_bytes = torch.tensor(tok.byte_lengths(cfg.model.vocab_size), dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    out: dict = {"heldout": {}}
    seq_len = min(cfg.seq_len, cfg.model.max_seq_len)
    batch = max(1, SCORE_BATCH_TOKENS // seq_len)
    if cfg.data.val_fraction > 0:  # evenly spaced val windows, as spud eval's intrinsic metrics
        loader = TokenLoader(run_dir, "val", 1, seq_len, cfg.seed)
        ids = np.unique(np.linspace(0, loader.windows_per_epoch - 1, val_windows).astype(np.int64))
        val = score_windows(model, loader.gather(ids), token_bytes, batch=batch)
        out.update(val_bpb=val["bpb"], val_loss=val["loss"], val_tokens=val["tokens"])
    for corpus in corpora:
        windows = heldout_windows(corpus, tok, seq_len, heldout_tokens)
        s = score_windows(model, windows, token_bytes, batch=batch)
        out["heldout"][corpus.name] = {"bpb": s["bpb"], "loss": s["loss"], "tokens": s["tokens"]}
    model.train(was_training)
    return out


def run_summary(run_dir: Path, tokens_per_step: int, flops_per_token: int) -> dict:
    """Speed and the validation curve of a finished run, from its metrics.jsonl (all sessions)."""
    records = read_metrics(run_dir / "metrics.jsonl")
    step_times = [r["step_time"] for r in records if r["kind"] == "train" and r.get("step_time")]
    train_s = sum(step_times)
    wall_s = sum(r.get("wall_s") or 0.0 for r in records if r.get("event") == "end")
    curve = [{"step": r["step"], "flops": r["step"] * tokens_per_step * flops_per_token,
              "bpb": r.get("bpb"), "loss": r.get("loss")} for r in records if r["kind"] == "val"]
    return {
        "wall_s": round(wall_s, 2),
        "train_s": round(train_s, 2),
        "tokens_per_s": len(step_times) * tokens_per_step / train_s if train_s else None,
        "step_time_ms": 1000 * statistics.median(step_times) if step_times else None,
        "curve": curve,
    }


def contamination(corpora: list, data_dir: Path, console, max_tokens: int = 50_000_000) -> list[dict]:
    """Each held-out corpus's description plus how many of its documents share a 13-gram with the
    shared data set (train + val shards), by the project's decontamination check
    (spud.eval.decontam, as `spud eval` runs it); cached in DIR/data/heldout_overlap.json."""
    from spud.data.shards import load_manifest
    from spud.eval.decontam import Probe, check

    cache_path = data_dir / "heldout_overlap.json"
    stamp = [s["sha256"] for s in load_manifest(data_dir)["shards"]]
    cache = {}
    if cache_path.is_file():
        try:
            cache = json.loads(cache_path.read_text(encoding="utf-8"))
        except ValueError:
            cache = {}
    keys = {c.name: f"{c.name}:{c.nbytes}:{len(c.documents)}" for c in corpora}
    stale = [c for c in corpora if (cache.get(keys[c.name]) or {}).get("shards") != stamp
             or "rate" not in cache[keys[c.name]].get("overlap", {})]  # older spud's format
    if stale:  # one pass over the data for every corpus not checked yet
        console.print(f"checking held-out corpora {', '.join(c.name for c in stale)} against the "
                      "training data (13-gram overlap)")
        probes = [Probe(c.name, i, doc) for c in stale for i, doc in enumerate(c.documents)]
        report = check(probes, data_dir, max_tokens=max_tokens)
        for c in stale:
            rates = report["tasks"][c.name]
            cache[keys[c.name]] = {"shards": stamp, "overlap": {
                "n": report["n"], "documents": rates["examples"], "contaminated": rates["contaminated"],
                "rate": rates["rate"], "examples": rates["first"], "complete": report["complete"]}}
    out = []
    for corpus in corpora:
        overlap = cache[keys[corpus.name]]["overlap"]
        if overlap["rate"] > 0.01:
            console.print(f"[yellow]held-out corpus {corpus.name}: {overlap['contaminated']} of "
                          f"{overlap['documents']} documents share a 13-gram with the training data; "
                          "it is not fully held out")
        out.append({**corpus.describe(), "overlap_13gram": overlap})
    cache_path.write_text(json.dumps(cache), encoding="utf-8")
    return out
