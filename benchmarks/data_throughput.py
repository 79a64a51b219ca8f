"""Data-build throughput: spud's read → filter → dedup → tokenize → shard vs raw HF `tokenizers`.

The corpus is generated on the fly (deterministic English-like prose, with planted exact and near
duplicates and planted junk so the filters have work to do) and written as one jsonl file. Each
round times, in alternation so drifting machine load hits all equally:

- raw:      the same documents, already in memory, through `tokenizers.Tokenizer.encode_batch`
            in batches of the size the build uses (no reading, no bookkeeping);
- raw_fast: the same with `encode_batch_fast` (no character offsets; what spud calls);
- off:      spud's path with cleaning and dedup off: `Source.documents()` (read, decode, JSON,
            checks) → `encoded_documents` (batched encode, [BOS] + ids) → val split → `ShardSet`;
- quality:  + the source's `clean: {kind: text}` rules;
- exact:    + exact dedup (normalised-content hash);
- near:     + MinHash/LSH near dedup (rensa, 128 permutations, 5-word shingles).

"of raw" divides by the faster raw variant. MB/s is input text bytes (UTF-8 of the documents) per
second; the median round is reported.
Both sides use the same Rust thread count (`--threads`, default 2 = the target machine).

`--minhash` (needs `pip install datasketch`, not a spud dependency) also times rensa's and
datasketch's MinHash on the same documents' shingles (the
shingles are computed once, outside the timers; datasketch gets them pre-encoded as bytes, which
it needs), 128 permutations each, alternating rounds. rensa's `update` only buffers: the signature
is computed at the first `digest()`/`jaccard()`, so the timer includes a `digest()` call (timing
`update` alone overstates rensa ~10×).

`--workers 1,2` times whole `spud data build`s (build_dataset: sources, mix, shards, manifest) of
the same corpus with each worker count (data.workers; 1 = one process), cleaning off and with
rules + exact + near dedup on, alternating rounds; the budget is ~one pass of what survives, and
the worker processes' start-up is inside the timer.

`--rss-gb G` (not for CI) generates a G-GB corpus on disk, runs `spud data build` on it in a
child process and reports the child's peak RSS (getrusage), to show memory does not grow with
the corpus.

    python benchmarks/data_throughput.py --mb 8 --rounds 3 --minhash
    python benchmarks/data_throughput.py --rss-gb 2 --no-throughput
    python benchmarks/data_throughput.py --mb 8 --rounds 3 --workers 1,2 --no-throughput
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=float, default=8.0, help="corpus size for the throughput rounds")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="RAYON_NUM_THREADS for both sides")
    p.add_argument("--minhash", action="store_true", help="also time rensa vs datasketch MinHash")
    p.add_argument("--minhash-docs", type=int, default=2000)
    p.add_argument("--rss-gb", type=float, default=0.0, help="peak RSS of a build of a corpus this big")
    p.add_argument("--no-throughput", action="store_true")
    p.add_argument("--workers", default="", help="comma-separated data.workers values to compare, e.g. 1,2")
    p.add_argument("--out", default="benchmarks/results/data_throughput.json")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------- synthetic corpus
_WORDS = ("the be to of and a in that have it for not on with he as you do at this but his by "
          "from they we say her she or an will my one all would there their what so up out if "
          "about who get which go me when make can like time no just him know take people into "
          "year your good some could them see other than then now look only come its over think "
          "also back after use two how our work first well way even new want because any these "
          "give day most us river garden system number market window winter letter engine story "
          "measure country silver orange careful quietly sudden history doctor village").split()


def documents(seed: int):
    """Endless deterministic documents: ~90% prose, ~4% exact copies of an earlier document,
    ~3% near copies (a few words changed), ~3% junk (bullet lists / hashtag spam)."""
    rng = random.Random(seed)
    recent: list[str] = []
    while True:
        r = rng.random()
        if recent and r < 0.04:
            doc = rng.choice(recent)
        elif recent and r < 0.07:
            words = rng.choice(recent).split(" ")
            for _ in range(max(1, len(words) // 50)):
                words[rng.randrange(len(words))] = rng.choice(_WORDS)
            doc = " ".join(words)
        elif r < 0.10:
            doc = "\n".join(f"- #{rng.choice(_WORDS)} #{rng.choice(_WORDS)}" for _ in range(rng.randint(5, 40)))
        else:
            sentences = []
            for _ in range(rng.randint(5, 60)):
                words = rng.choices(_WORDS, k=rng.randint(6, 20))
                sentences.append(" ".join(words).capitalize() + ".")
            doc = " ".join(sentences)
            recent.append(doc)
            if len(recent) > 500:
                recent.pop(rng.randrange(len(recent)))
        yield doc


def write_corpus(path: Path, nbytes: int, seed: int = 0) -> int:
    written = 0
    with path.open("w", encoding="utf-8") as f:
        for doc in documents(seed):
            line = json.dumps({"text": doc}) + "\n"
            f.write(line)
            written += len(line)
            if written >= nbytes:
                break
    return written


# ------------------------------------------------------------------------------------ stages
def make_cfg(corpus: Path, stage: str, total_tokens: int = 10**12):
    from spud.config import validate_config

    source = {"name": "web", "type": "jsonl", "path": str(corpus)}
    if stage in ("quality", "exact", "near"):
        source["clean"] = {"kind": "text"}
    dedup = {"exact": stage in ("exact", "near"), "near": stage == "near"}
    return validate_config({"data": {"sources": [source], "total_tokens": total_tokens,
                                     "dedup": dedup, "val_fraction": 0.02},
                            "tokenizer": {"vocab_size": 4096, "train_bytes": 2_000_000}})


def run_pipeline(cfg, tokenizer, out_dir: Path) -> tuple[int, int]:
    """One pass of the build's per-document path; returns (input bytes, tokens written)."""
    from spud.data.mix import encoded_documents, is_val_document
    from spud.data.shards import ShardSet
    from spud.data.sources import open_sources

    (source,) = open_sources(cfg)
    shards = ShardSet(out_dir, cfg.data.shard_tokens, tokenizer.vocab_size)
    nbytes = tokens = 0
    for doc, ids in encoded_documents(source.documents(), tokenizer, lambda: 1 << 40):
        shards("val" if is_val_document(doc.text, cfg.data.val_fraction) else "train", ids)
        nbytes += doc.nbytes
        tokens += len(ids)
    shards.close()
    return nbytes, tokens


def run_raw(texts: list[str], backend, batch_bytes: int, fast: bool = False) -> int:
    """Plain `tokenizers` batch-encode in batches of ~batch_bytes (as the build batches).
    fast: `encode_batch_fast` (tokenizers >= 0.20: no character offsets), which spud uses."""
    encode = backend.encode_batch_fast if fast else backend.encode_batch
    tokens, batch, size = 0, [], 0
    for t in texts:
        batch.append(t)
        size += len(t)
        if size >= batch_bytes or len(batch) >= 4096:
            tokens += sum(len(e.ids) for e in encode(batch, add_special_tokens=False))
            batch, size = [], 0
    if batch:
        tokens += sum(len(e.ids) for e in encode(batch, add_special_tokens=False))
    return tokens


def throughput(args, work: Path) -> dict:
    from spud.data.mix import MAX_BATCH_BYTES
    from spud.tokenizer import train_tokenizer

    corpus = work / "corpus.jsonl"
    write_corpus(corpus, int(args.mb * 1e6))
    texts = [json.loads(line)["text"] for line in corpus.open(encoding="utf-8")]
    text_bytes = sum(len(t.encode("utf-8")) for t in texts)
    cfg = make_cfg(corpus, "off")
    tokenizer = train_tokenizer(iter(texts[:2000]), cfg.tokenizer)
    stages = ["raw", "raw_fast", "off", "quality", "exact", "near"]
    times: dict[str, list[float]] = {s: [] for s in stages}
    kept: dict[str, int] = {}
    run_raw(texts[:200], tokenizer.backend, MAX_BATCH_BYTES)  # warm the thread pool
    for r in range(args.rounds):
        for stage in stages:
            t0 = time.perf_counter()
            if stage.startswith("raw"):
                run_raw(texts, tokenizer.backend, MAX_BATCH_BYTES, fast=stage == "raw_fast")
                kept[stage] = text_bytes
            else:
                out = work / f"shards_{stage}_{r}"
                out.mkdir()
                kept[stage], _ = run_pipeline(make_cfg(corpus, stage), tokenizer, out)
            times[stage].append(time.perf_counter() - t0)
            print(f"round {r + 1} {stage:8s} {times[stage][-1]:.2f}s", flush=True)
    rows = {}
    for stage in stages:
        t = statistics.median(times[stage])
        rows[stage] = {"seconds_median": round(t, 3), "seconds": [round(x, 3) for x in times[stage]],
                       "input_mb_per_s": round(text_bytes / t / 1e6, 2), "kept_bytes": kept[stage]}
    base = min(rows["raw"]["seconds_median"], rows["raw_fast"]["seconds_median"])
    for stage in stages:
        rows[stage]["share_of_raw"] = round(base / rows[stage]["seconds_median"], 3)
    for prev, stage in zip(stages[2:], stages[3:]):
        rows[stage]["added_seconds_per_gb"] = round(
            (rows[stage]["seconds_median"] - rows[prev]["seconds_median"]) / text_bytes * 1e9, 1)
    print(f"\n{'stage':9s} {'MB/s':>7s} {'of raw':>7s} {'+s/GB':>7s} {'kept':>6s}")
    for stage in stages:
        row = rows[stage]
        print(f"{stage:9s} {row['input_mb_per_s']:7.2f} {row['share_of_raw']:7.1%} "
              f"{row.get('added_seconds_per_gb', ''):>7} {row['kept_bytes'] / text_bytes:6.1%}")
    return {"corpus_bytes": text_bytes, "documents": len(texts), "stages": rows}


def workers_compare(args, work: Path) -> dict:
    """Whole builds with each data.workers value, cleaning off and all on, alternating rounds."""
    import shutil

    from spud.data.build import build_dataset
    from spud.tokenizer import train_tokenizer

    counts = [int(w) for w in args.workers.split(",")]
    corpus = work / "corpus_w.jsonl"
    write_corpus(corpus, int(args.mb * 1e6), seed=3)
    texts = [json.loads(line)["text"] for line in corpus.open(encoding="utf-8")]
    text_bytes = sum(len(t.encode("utf-8")) for t in texts)
    tok_file = work / "tokenizer_w.json"
    train_tokenizer(iter(texts[:2000]), make_cfg(corpus, "off").tokenizer).save(tok_file)
    from spud.tokenizer import Tokenizer

    budgets = {}
    for stage in ("off", "near"):  # ~one pass of what survives the stage, read once, untimed
        out = work / f"pass_{stage}"
        out.mkdir()
        _, tokens = run_pipeline(make_cfg(corpus, stage), Tokenizer.load(tok_file), out)
        budgets[stage] = int(tokens * 0.98)
    times = {(stage, w): [] for stage in budgets for w in counts}
    rss = {}
    for r in range(args.rounds):
        for stage in budgets:
            for w in (counts if r % 2 == 0 else counts[::-1]):
                run = work / f"build_{stage}_{w}_{r}"
                run.mkdir()
                shutil.copy(tok_file, run / "tokenizer.json")
                cfg = make_cfg(corpus, stage, budgets[stage])
                cfg.data.workers = w
                t0 = time.perf_counter()
                m = build_dataset(cfg, run, progress=False, log=lambda *_: None)
                times[(stage, w)].append(time.perf_counter() - t0)
                rss[(stage, w)] = (m["peak_rss_mb"], m["workers_peak_rss_mb"])
                shutil.rmtree(run)
                print(f"round {r + 1} build {stage:4s} workers={w} {times[(stage, w)][-1]:.2f}s", flush=True)
    rows = {}
    print(f"\n{'build':6s} {'workers':>7s} {'MB/s':>7s} {'speed-up':>8s}")
    for (stage, w), t in times.items():
        med = statistics.median(t)
        rows[f"{stage}_w{w}"] = {"seconds_median": round(med, 3), "seconds": [round(x, 3) for x in t],
                                 "input_mb_per_s": round(text_bytes / med / 1e6, 2),
                                 "speedup_over_first": round(statistics.median(times[(stage, counts[0])]) / med, 3),
                                 "peak_rss_mb": rss[(stage, w)][0], "worker_peak_rss_mb": rss[(stage, w)][1]}
        row = rows[f"{stage}_w{w}"]
        print(f"{stage:6s} {w:7d} {row['input_mb_per_s']:7.2f} {row['speedup_over_first']:8.2f}x")
    return {"corpus_bytes": text_bytes, "budgets": budgets, "rows": rows}


def minhash(args) -> dict:
    from datasketch import MinHash
    from rensa import RMinHash

    from spud.data.dedup import shingles

    docs = [d for _, d in zip(range(args.minhash_docs), documents(1))]
    sh = [shingles(d, 5) for d in docs]
    sh_bytes = [[s.encode("utf-8") for s in x] for x in sh]
    times = {"rensa": [], "datasketch": []}
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        for x in sh:
            m = RMinHash(128, 0)
            m.update(x)
            m.digest()  # rensa computes the signature lazily; dedup always needs it
        times["rensa"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for x in sh_bytes:
            m = MinHash(num_perm=128, seed=0)
            m.update_batch(x)
        times["datasketch"].append(time.perf_counter() - t0)
    out = {k: {"seconds_median": round(statistics.median(v), 4),
               "docs_per_s": round(len(docs) / statistics.median(v), 1)} for k, v in times.items()}
    out["speedup_rensa_over_datasketch"] = round(out["datasketch"]["seconds_median"]
                                                 / out["rensa"]["seconds_median"], 2)
    out["documents"], out["shingles"] = len(docs), sum(len(x) for x in sh)
    print(f"\nMinHash (128 perms, {len(docs)} docs, {out['shingles']} shingles): "
          f"rensa {out['rensa']['docs_per_s']:.0f} docs/s, datasketch "
          f"{out['datasketch']['docs_per_s']:.0f} docs/s → rensa ×{out['speedup_rensa_over_datasketch']}")
    return out


def peak_rss(args, work: Path) -> dict:
    """`spud data build` of a generated args.rss_gb-GB corpus in a child process."""
    import yaml

    from spud.tokenizer import train_tokenizer

    corpus = work / "big.jsonl"
    t0 = time.perf_counter()
    nbytes = write_corpus(corpus, int(args.rss_gb * 1e9), seed=2)
    print(f"generated {nbytes / 1e9:.2f} GB in {time.perf_counter() - t0:.0f}s", flush=True)
    run = work / "run"
    run.mkdir()
    cfg = make_cfg(corpus, "off")
    sample = [d for _, d in zip(range(2000), documents(2))]
    train_tokenizer(iter(sample), cfg.tokenizer).save(run / "tokenizer.json")
    # ~4.5 bytes/token on this corpus: a budget of about one pass.
    cfg_path = work / "big.yaml"
    cfg_path.write_text(yaml.safe_dump(make_cfg(corpus, "off", int(nbytes / 4.5)).model_dump(mode="json")))
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    env = {**os.environ, "RAYON_NUM_THREADS": str(args.threads)}
    subprocess.run([sys.executable, "-m", "spud.cli", "data", "build", str(cfg_path), "--out", str(run)],
                   check=True, env=env, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    out = {"corpus_bytes": nbytes, "seconds": round(seconds, 1), "peak_rss_mb": round(max(rss, before) / 1024, 1),
           "mb_per_s": round(nbytes / seconds / 1e6, 2)}
    print(f"\nbuild of {nbytes / 1e9:.2f} GB: {seconds:.0f}s, peak RSS {out['peak_rss_mb']} MB")
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)  # before the first tokenizer use
    result = {"machine": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads,
              "loadavg_before": os.getloadavg(), "args": vars(args)}
    with tempfile.TemporaryDirectory(prefix="spud-data-bench-") as tmp:
        work = Path(tmp)
        if not args.no_throughput:
            result["throughput"] = throughput(args, work)
        if args.workers:
            result["workers"] = workers_compare(args, work)
        if args.minhash:
            result["minhash"] = minhash(args)
        if args.rss_gb:
            result["peak_rss"] = peak_rss(args, work)
    result["loadavg_after"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"load average before {result['loadavg_before']}, after {result['loadavg_after']}; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
