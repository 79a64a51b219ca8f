"""The report's inputs: a run's config, evaluation results and wall time, read without failing."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path


def _read_json(path: Path) -> dict | None:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


def _step_of(name: str) -> int | None:
    m = re.search(r"(\d+)$", name)
    return int(m.group(1)) if m else None


def _num(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def load_evals(run: Path) -> list[dict]:
    """Every RUN/eval/<model>-<checkpoint>/results.json, ordered by model, then training step.
    `_model` is the model the results say they measure ("base", "chat"); results written before
    spud recorded it say "unknown" rather than guess."""
    out = []
    for p in sorted((run / "eval").glob("*/results.json")):
        r = _read_json(p)
        if r is not None:
            r["_name"] = p.parent.name
            r["_model"] = str(r.get("model") or "unknown")
            step = r.get("step")
            r["_step"] = step if isinstance(step, int) and not isinstance(step, bool) else _step_of(p.parent.name)
            out.append(r)
    out.sort(key=lambda r: (r["_model"], r["_step"] is None, r["_step"] or 0, r["_name"]))
    return out


def _vocab_size(run: Path, cfg: dict) -> int | None:
    try:
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(run / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    except Exception:  # noqa: BLE001 - missing or unreadable: fall back to the config
        v = (cfg.get("tokenizer") or {}).get("vocab_size")
        return v if isinstance(v, int) else None


def _read_config(run: Path) -> dict:
    try:
        import yaml

        tree = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    except Exception:  # noqa: BLE001
        return {}
    return tree if isinstance(tree, dict) else {}


def _wall_seconds(rows: list[dict]) -> float | None:
    """Training wall time: `end`/`interrupt` events carry it per segment (a resumed run has
    several); without them (still running, crashed), last record time minus the start."""
    events = [r for r in rows if r.get("kind") == "event"]
    segs = [_num(r.get("wall_s")) for r in events if r.get("event") in ("end", "interrupt")]
    segs = [s for s in segs if s is not None]
    if segs:
        return sum(segs)
    starts = [_num(r.get("time")) for r in events if r.get("event") in ("start", "resume")]
    times = [_num(r.get("time")) for r in rows]
    starts, times = [t for t in starts if t], [t for t in times if t]
    return (max(times) - min(starts)) if starts and times else None
