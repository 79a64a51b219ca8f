"""Helpers shared by the data tests (a uniquely named module: tests/ has no packages)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from spud.config import Config, validate_config
from spud.data.sources import SourceStats, open_sources


def make_cfg(sources: list[dict], seed: int = 0, **data) -> Config:
    data.setdefault("total_tokens", 20_000)
    return validate_config({
        "seed": seed,
        "data": {"sources": sources, **data},
        "tokenizer": {"vocab_size": 512, "train_bytes": 200_000},
    })


# Manifest keys that say how a build ran (time, processes, memory), not what it made.
RUN_KEYS = ("build_seconds", "workers", "peak_rss_mb", "workers_peak_rss_mb")


def what_was_built(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k not in RUN_KEYS}


def quiet(*_args) -> None:
    """A `log` that prints nothing."""


def write_jsonl(path: Path, records: list) -> Path:
    """Each item is a JSON-serializable record, or a str written verbatim as the line."""
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def read_source(source: dict, seed: int = 0) -> tuple[list[str], SourceStats]:
    """All documents of one pass of a single source, and what it skipped."""
    (src,) = open_sources(make_cfg([source], seed))
    return [d.text for d in src.documents()], src.stats


# Filler prose for the generated corpora with planted duplicates and junk.
WORDS = ("the miller counts sacks of grain that farmers bring with carts before market opens in "
         "town where children play near river and bakers sell bread to travellers").split()


def page(seed: int, n: int = 90) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."
