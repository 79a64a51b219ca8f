"""`build_dataset`: sources → tokenizer (if the run has none) → token shards + manifest.

The order is chosen so that mistakes cost seconds: every source is validated before anything is
written, the tokenizer is trained only when `run_dir/tokenizer.json` is missing, and a dataset that
was already built from the same data config, seed, inputs and tokenizer is reused instead of
re-tokenized (a resumed or re-launched training run starts immediately).
"""

from __future__ import annotations

import hashlib
import json
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

from spud.config import Config
from spud.data.mix import mix_tokens, sample_texts_for_tokenizer
from spud.data.shards import (
    FORMAT_VERSION,
    MANIFEST,
    ShardSet,
    load_manifest,
    shards_present,
    staged_data_dir,
    verify_shards,
    write_manifest,
)
from spud.data.sources import Source, open_sources
from spud.errors import SpudError
from spud.tokenizer import Tokenizer, train_tokenizer

__all__ = ["build_dataset", "load_manifest", "validate_sources", "verify_shards"]

# Settings that change how the build runs but not a single output byte; excluded from the
# "same config → reuse" comparison so e.g. a different thread count does not force a rebuild.
_NON_OUTPUT_KEYS = ("workers",)
INSPECT_FILE = "inspect.json"  # samples of dropped and kept documents per source and reason


def validate_sources(cfg: Config) -> list[Source]:
    """Check every source (paths, permissions, parquet columns, builtin names); SpudError listing
    all problems at once. Returns the opened sources."""
    return open_sources(cfg)


def _data_identity(data_config: dict) -> dict:
    return {k: v for k, v in data_config.items() if k not in _NON_OUTPUT_KEYS}


def _inputs_fingerprint(sources: list[Source]) -> str:
    blob = json.dumps([s.fingerprint() for s in sources], sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB (2^20 bytes), over its life so far: for `spud
    data build` that is the build. (Worker processes report their own: spud.data.workers.)"""
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20, 1)


def _reusable(run_dir: Path, cfg: Config, tokenizer: Tokenizer, fingerprint: str) -> dict | None:
    """The existing manifest if it was built from exactly these inputs, else None (with why)."""
    if not (run_dir / "data" / MANIFEST).is_file():
        return None
    try:
        old = load_manifest(run_dir)
    except SpudError:
        return None  # corrupt or old format: rebuilt (atomically) below
    same = (
        isinstance(old.get("data_config"), dict)
        and _data_identity(old["data_config"]) == _data_identity(cfg.data.model_dump(mode="json"))
        and old.get("seed") == cfg.seed
        and old.get("tokenizer_sha256") == tokenizer.sha256()
        and old.get("inputs_fingerprint") == fingerprint
    )
    return old if same and shards_present(run_dir, old) else None


def _load_or_train_tokenizer(cfg: Config, run_dir: Path, log: Callable[[str], None]) -> Tokenizer:
    path = run_dir / "tokenizer.json"
    if path.is_file():
        tok = Tokenizer.load(path)
        log(f"using existing {path} ({tok.vocab_size} tokens)")
        return tok
    log(f"training a {cfg.tokenizer.vocab_size}-token BPE tokenizer on "
        f"{cfg.tokenizer.train_bytes / 1e6:.1f} MB of the mix")
    t0 = time.perf_counter()
    tok = train_tokenizer(sample_texts_for_tokenizer(cfg), cfg.tokenizer)
    tok.save(path)
    log(f"wrote {path} ({tok.vocab_size} tokens, {time.perf_counter() - t0:.1f}s)")
    return tok


def build_dataset(
    cfg: Config, run_dir: str | Path, progress: bool = True, log: Callable[[str], None] = print
) -> dict:
    """Build (or reuse) `run_dir/data/`: token shards and manifest.json. Returns the manifest."""
    run_dir = Path(run_dir)
    sources = validate_sources(cfg)  # before anything touches run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = _load_or_train_tokenizer(cfg, run_dir, log)
    fingerprint = _inputs_fingerprint(sources)

    existing = _reusable(run_dir, cfg, tokenizer, fingerprint)
    if existing is not None:
        log(f"reusing {run_dir / 'data'}: built from the same data config, inputs and tokenizer "
            f"({existing['train_tokens']:,} train / {existing['val_tokens']:,} val tokens)")
        return existing
    if (run_dir / "data").exists():
        log(f"rebuilding {run_dir / 'data'}: data config, inputs or tokenizer changed")

    return write_dataset(cfg, run_dir, tokenizer, sources, fingerprint, progress, log)


def write_dataset(cfg: Config, run_dir: Path, tokenizer: Tokenizer, sources: list[Source],
                  fingerprint: str, progress: bool, log: Callable[[str], None],
                  encoder: Tokenizer | None = None) -> dict:
    """Mix `sources` into `run_dir/data/` (atomically) and return the manifest. `encoder` is what
    tokenizes (the merge passes one that replays its parts' tokens); `tokenizer` is recorded."""
    t0 = time.perf_counter()
    with staged_data_dir(run_dir) as staging:
        shard_set = ShardSet(staging, cfg.data.shard_tokens, tokenizer.vocab_size)
        try:
            ran: dict = {}
            reports = mix_tokens(cfg, encoder or tokenizer, shard_set, progress=progress, log=log,
                                 sources=sources, ran=ran)
        finally:
            shards = shard_set.close()
        manifest = {
            "format_version": FORMAT_VERSION,
            "dtype": shard_set.dtype.name,
            "vocab_size": tokenizer.vocab_size,
            "bos_id": tokenizer.bos_id,
            "tokenizer_sha256": tokenizer.sha256(),
            "train_tokens": sum(s["tokens"] for s in shards if s["split"] == "train"),
            "val_tokens": sum(s["tokens"] for s in shards if s["split"] == "val"),
            "shards": shards,
            "sources": reports,
            "warnings": [w for r in reports for w in r["warnings"]],
            "data_config": _data_identity(cfg.data.model_dump(mode="json")),
            "seed": cfg.seed,
            "inputs_fingerprint": fingerprint,
            # How the build ran, not what it made (the only keys that differ between builds of
            # one config): seconds, worker processes, peak RSS of the build and of one worker.
            "build_seconds": round(time.perf_counter() - t0, 2),
            "workers": ran["workers"],
        }
        manifest["peak_rss_mb"] = peak_rss_mb()
        manifest["workers_peak_rss_mb"] = ran.get("workers_peak_rss_mb")
        write_manifest(staging, manifest)
        samples = {s.name: {"dropped": s.cleaner.examples, "kept": s.cleaner.kept}
                   for s in sources if s.cleaner is not None}
        if samples:  # what `spud data inspect` shows
            (staging / INSPECT_FILE).write_text(json.dumps(samples, indent=1), encoding="utf-8")
    log(f"wrote {run_dir / 'data'}: {manifest['train_tokens']:,} train / "
        f"{manifest['val_tokens']:,} val tokens in {len(shards)} shards "
        f"({manifest['build_seconds']:.1f}s)")
    return manifest
