"""Decontamination: does any evaluation example occur in the data the evaluated model trained on?

Two checks, run on every evaluation of a run (`spud eval`, the demo's chat eval):

- n-gram overlap (the GPT-3 / Llama reports' method): an example (prompt + gold answer) is
  contaminated when any of its 13-grams occurs in a training text. Text is normalised first:
  lower case, split into words (runs of letters and digits) and single punctuation marks, so
  whitespace and line breaks do not matter. An example shorter than 13 words counts as
  contaminated only if it occurs whole.
- fact overlap, for examples that declare their arithmetic facts (the synthetic generators):
  a one-operation example is contaminated when its (op, a, b) is stated anywhere in the training
  data ("31 + 88", "thirty-one plus eighty-eight", "add 31 and 88" all count, and "88 + 31" too);
  a multi-step example when all of its facts are stated in one training line (one document line
  of pretraining text, one SFT conversation).

What is scanned is what the model trained on: the run's train token shards, decoded back to text
document by document, and for a chat model also its SFT data (the JSONL files it was given and the
regenerated built-in conversations). Val shards and SFT val conversations are scanned too: held
out from the loss, but on disk next to the training data, so a leak there is worth knowing.

Cost: the eval side is small and is what gets indexed (a hash → example table of a few 10^5
entries); the training side is streamed in chunks of `CHUNK_TOKENS`, its words hashed with
vectorised numpy (a word the eval sets never use maps to one shared sentinel without being hashed),
so memory stays at a few chunks whatever the data size and time is linear in it. Measured on the
demo run (5M pretraining tokens + 20,000 built-in SFT conversations, 500 eval questions): 10.6 s
of CPU time, of which ~3.5 s regenerate the built-in conversations. `max_tokens` caps the scan for huge runs; the report then
says how much of the data was read (`complete: false`), and its rates are lower bounds. (A
window that spans two chunks, i.e. a document cut at a 1M-token boundary, is not checked.)
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from spud.data.facts import extract_facts

NGRAM = 13
CHUNK_TOKENS = 1 << 20
DEFAULT_MAX_TOKENS = 200_000_000  # `spud eval` scans at most this much pretraining data (~minutes)
_TOKEN = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")
_MULT = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit multiplier of the rolling hash
_UNKNOWN = np.uint64(0x5BD1E9955BD1E995)  # any word no eval example uses
_SEP = np.uint64(0xC2B2AE3D27D4EB4F)      # between two training texts: no window may span it
_JOIN = "\n|\n"                            # likewise for facts: "a op b" cannot span a "|"


def words(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def _word_hash(w: str) -> np.uint64:
    return np.uint64(int.from_bytes(hashlib.blake2b(w.encode("utf-8"), digest_size=8).digest(), "little"))


@dataclass
class Probe:
    """One eval example as the check sees it."""
    task: str
    index: int
    text: str                             # prompt + gold answer
    facts: frozenset = frozenset()        # canonical (op, a, b) tuples; empty: no fact check


@dataclass
class _Hits:
    ngram: set = field(default_factory=set)   # (task, index)
    facts: set = field(default_factory=set)
    where: dict = field(default_factory=dict)  # (task, index) → first training unit it was seen in


class Index:
    """The eval side: hashes of every example's n-grams (or whole text when shorter) and facts."""

    def __init__(self, probes: list[Probe], n: int = NGRAM):
        self.n, self.probes = n, probes
        self.vocab: dict[str, np.uint64] = {}
        self.grams: dict[int, dict[int, list[tuple[str, int]]]] = {}  # length → hash → probes
        self.single: dict[tuple, list[tuple[str, int]]] = {}          # fact → one-fact probes
        self.multi: list[tuple[frozenset, tuple[str, int]]] = []
        for p in probes:
            ids = [self._id(w) for w in words(p.text)]
            k = min(n, len(ids))
            if k == 0:
                continue
            for h in _rolling(np.array(ids, dtype=np.uint64), k).tolist():
                self.grams.setdefault(k, {}).setdefault(h, []).append((p.task, p.index))
            if len(p.facts) == 1:
                self.single.setdefault(next(iter(p.facts)), []).append((p.task, p.index))
            elif p.facts:
                self.multi.append((p.facts, (p.task, p.index)))
        self.arrays = {k: np.sort(np.fromiter(d.keys(), dtype=np.uint64, count=len(d)))
                       for k, d in self.grams.items()}
        self.wanted = set(self.single) | {f for fs, _ in self.multi for f in fs}
        self.numbers = frozenset(str(x) for _, a, b in self.wanted for x in (a, b))

    def _id(self, w: str) -> np.uint64:
        if w not in self.vocab:
            self.vocab[w] = _word_hash(w)
        return self.vocab[w]

    def scan_ngrams(self, texts: list[str], where: str, hits: _Hits) -> int:
        """Mark probes with an n-gram in `texts` (one vectorised pass over all of them, a
        separator between texts); → words scanned."""
        get, unknown, ids = self.vocab.get, _UNKNOWN, []
        for text in texts:
            ids.extend([get(w, unknown) for w in words(text)])
            ids.append(_SEP)
        total = len(ids) - len(texts)
        arr = np.array(ids, dtype=np.uint64)
        for k, wanted in self.arrays.items():
            if len(arr) < k or not len(wanted):
                continue
            h = _rolling(arr, k)
            pos = np.minimum(np.searchsorted(wanted, h), len(wanted) - 1)
            for g in np.unique(h[wanted[pos] == h]).tolist():
                for key in self.grams[k][g]:
                    hits.ngram.add(key)
                    hits.where.setdefault(key, where)
        return total

    def scan_facts(self, units: list[str], where: str, hits: _Hits, per_line: bool) -> None:
        """Mark probes whose facts `units` state: a one-fact probe anywhere, a multi-step probe
        only when all its facts are in one unit (one line of it when per_line)."""
        if not self.wanted:
            return
        found = extract_facts(_JOIN.join(units), self.numbers) & self.wanted  # one pass, then narrow
        for f in found:
            for key in self.single.get(f, ()):
                hits.facts.add(key)
                hits.where.setdefault(key, where)
        candidates = [(fs, key) for fs, key in self.multi if fs <= found]
        if not candidates:
            return
        for unit in units:
            for line in unit.split("\n") if per_line else [unit]:
                lf = extract_facts(line, self.numbers) & self.wanted
                for fs, key in candidates:
                    if fs <= lf:
                        hits.facts.add(key)
                        hits.where.setdefault(key, where)


def _rolling(ids: np.ndarray, k: int) -> np.ndarray:
    """Hash of every k-word window: sum of ids[i+j] * M^(k-1-j) mod 2^64, length folded in."""
    m = len(ids) - k + 1
    h = np.full(m, np.uint64(k), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(k):
            h = h * _MULT + ids[j:j + m]
    return h


# -------------------------------------------------------------------------- training sources
def shard_documents(run_dir: Path, max_tokens: int | None) -> Iterator[tuple[str, list[str], int]]:
    """(where, documents, tokens) per chunk of a run's token shards, decoded with its tokenizer."""
    from spud.data.shards import load_manifest
    from spud.tokenizer import Tokenizer

    manifest = load_manifest(run_dir)
    tok = Tokenizer.load(run_dir / "tokenizer.json")
    dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
    bos, read = manifest["bos_id"], 0
    for shard in manifest["shards"]:
        data = np.memmap(run_dir / "data" / shard["file"], dtype=dtype, mode="r")
        for start in range(0, len(data), CHUNK_TOKENS):
            take = CHUNK_TOKENS if max_tokens is None else min(CHUNK_TOKENS, max_tokens - read)
            if take <= 0:
                return
            chunk = np.asarray(data[start:start + take], dtype=np.int64)
            cuts = np.flatnonzero(chunk == bos)
            pieces = [p for p in np.split(chunk, cuts) if len(p)]
            docs = tok.backend.decode_batch([p.tolist() for p in pieces], skip_special_tokens=True)
            read += len(chunk)
            yield f"{run_dir}/data/{shard['file']}", docs, len(chunk)


def _run_config(run_dir: Path) -> dict:
    path = run_dir / "config.yaml"
    return (yaml.safe_load(path.read_text(encoding="utf-8")) or {}) if path.is_file() else {}


def sft_conversations(run_dir: Path) -> Iterator[tuple[str, str]]:
    """(where, text) per conversation of a chat run's SFT data, as `spud sft` read it."""
    from spud.posttrain import builtin_chat
    from spud.posttrain.builtin_tools import record_text
    from spud.posttrain.chat_data import parse_data_spec

    cfg = _run_config(run_dir)
    sft = cfg.get("sft") or {}
    for spec in sft.get("data") or []:
        path, _ = parse_data_spec(spec)
        if path == "builtin":
            n = int(sft.get("builtin_conversations", 20000))
            share = float(sft.get("tool_share", 0.0))  # runs from before tool data had none
            for i, rec in enumerate(builtin_chat.records(n, int(cfg.get("seed", 0)), share)):
                yield f"sft builtin:{i + 1}", record_text(rec["messages"])
            continue
        p = Path(path)
        if not p.is_file():
            yield f"sft {path} (missing: not checked)", ""
            continue
        with p.open(encoding="utf-8", errors="replace") as fh:
            for lineno, line in enumerate(fh, 1):
                try:
                    msgs = json.loads(line).get("messages") or []
                    text = record_text([m for m in msgs if isinstance(m, dict)])  # with tool calls
                except (json.JSONDecodeError, AttributeError, TypeError):
                    continue  # spud sft skipped it too
                yield f"sft {path}:{lineno}", text


def training_runs(run_dir: Path) -> tuple[Path | None, Path | None]:
    """(pretraining run, SFT run) behind the model in run_dir (a base run or a chat run)."""
    sft = (_run_config(run_dir).get("sft") or {})
    if sft.get("base_checkpoint") and sft.get("base_run"):
        return Path(sft["base_run"]), run_dir
    return run_dir, None


# ---------------------------------------------------------------------------------- the check
def check(probes: list[Probe], run_dir: str | Path, max_tokens: int | None = None, n: int = NGRAM) -> dict:
    """Scan the training data behind the model in `run_dir` (RUN for a base model, RUN/chat for
    a chat model) for `probes`. → {"tasks": {task: rates}, "sources": ..., "complete", ...}."""
    t0 = time.monotonic()
    index, hits = Index(probes, n), _Hits()
    base, sft = training_runs(Path(run_dir))
    sources: dict = {}
    complete = True
    if base is not None and (base / "data" / "manifest.json").is_file():
        tokens = words_ = 0
        for where, docs, count in shard_documents(base, max_tokens):
            words_ += index.scan_ngrams(docs, where, hits)
            index.scan_facts(docs, where, hits, per_line=True)
            tokens += count
        from spud.data.shards import load_manifest
        m = load_manifest(base)
        total = int(m["train_tokens"]) + int(m["val_tokens"])
        complete = tokens >= total
        sources["pretraining"] = {"run": str(base), "tokens": tokens, "of_tokens": total, "words": words_}
    elif base is not None:
        complete = False
        sources["pretraining"] = {"run": str(base), "error": "no data/manifest.json: not checked"}
    if sft is not None:
        convs = words_ = 0
        missing = []
        batch: list[str] = []
        for where, text in sft_conversations(sft):
            if where.endswith("not checked)"):
                missing.append(where)
                continue
            convs += 1
            batch.append((where, text))
            if len(batch) >= 2048:
                words_ += _scan_sft(index, batch, hits)
                batch = []
        words_ += _scan_sft(index, batch, hits)
        sources["sft"] = {"run": str(sft), "conversations": convs, "words": words_}
        if missing:
            sources["sft"]["missing"] = missing
            complete = False
    return {"method": f"{n}-gram overlap of prompt+answer (lowercased words), exact arithmetic facts",
            "n": n, "tasks": _rates(probes, hits), "sources": sources, "complete": complete,
            "seconds": round(time.monotonic() - t0, 2)}


def _scan_sft(index: Index, batch: list[tuple[str, str]], hits: _Hits) -> int:
    if not batch:
        return 0
    where = batch[0][0] if len(batch) == 1 else f"{batch[0][0]} .. {batch[-1][0].split(':')[-1]}"
    texts = [t for _, t in batch]
    index.scan_facts(texts, where, hits, per_line=False)
    return index.scan_ngrams(texts, where, hits)


def _rates(probes: list[Probe], hits: _Hits) -> dict:
    out: dict = {}
    for p in probes:
        r = out.setdefault(p.task, {"examples": 0, "ngram": 0, "with_facts": 0, "facts": 0,
                                    "contaminated": 0, "first": []})
        key = (p.task, p.index)
        r["examples"] += 1
        r["with_facts"] += bool(p.facts)
        r["ngram"] += key in hits.ngram
        r["facts"] += key in hits.facts
        if key in hits.ngram or key in hits.facts:
            r["contaminated"] += 1
            if len(r["first"]) < 3:
                r["first"].append({"index": p.index, "text": p.text[:200], "seen_in": hits.where.get(key)})
    for r in out.values():
        r["rate"] = r["contaminated"] / r["examples"] if r["examples"] else 0.0
    return out


def summary_line(report: dict) -> str:
    """"0 of 500 examples (0.0%) overlap the training data (13-gram or fact) ..." for consoles."""
    n = sum(r["examples"] for r in report["tasks"].values())
    k = sum(r["contaminated"] for r in report["tasks"].values())
    scanned = []
    pre = report["sources"].get("pretraining", {})
    if "tokens" in pre:
        scanned.append(f"{pre['tokens']:,} pretraining tokens")
    sft = report["sources"].get("sft", {})
    if "conversations" in sft:
        scanned.append(f"{sft['conversations']:,} SFT conversations")
    part = "" if report["complete"] else " (PARTIAL scan: rates are lower bounds)"
    return (f"{k} of {n} eval examples ({k / max(n, 1):.1%}) overlap the training data "
            f"({report['n']}-gram or arithmetic fact); scanned {' + '.join(scanned) or 'nothing'} "
            f"in {report['seconds']:.1f} s{part}")


def task_probes(tasks: Iterable) -> list[Probe]:
    """Probes for spud.eval tasks: prompt + gold answer (the right choice of a multiple-choice
    example, the reference solution of a code example), with the example's declared facts."""
    out = []
    for t in tasks:
        for i, ex in enumerate(t.examples):
            if t.kind == "mc" and ex.choices and ex.label is not None:
                gold = ex.choices[ex.label]
            else:
                gold = ex.demo if t.kind == "code" else ex.target
            out.append(Probe(t.name, i, f"{ex.prompt} {gold}".strip(), frozenset(ex.facts or ())))
    return out
