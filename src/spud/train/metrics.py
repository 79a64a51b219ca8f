"""metrics.jsonl: one JSON object per line, each with `step` and `kind` (train, val, sample, event).

Written line by line and flushed, so a crashed run keeps every measurement up to the crash and
the file can be tailed or plotted while training runs.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any


class MetricsLog:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", encoding="utf-8")

    def write(self, kind: str, step: int, **fields: Any) -> dict:
        record = {"kind": kind, "step": step, "time": round(time.time(), 3), **fields}
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()
        return record

    def close(self) -> None:
        self._fh.close()


def read_metrics(path: Path) -> list[dict]:
    """All records; a torn last line (crash mid-write) is ignored rather than fatal."""
    out = []
    p = Path(path)
    if not p.is_file():
        return out
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def truncate_after(path: Path, step: int) -> None:
    """On resume, drop records of steps after the checkpoint: they are about to be recomputed
    (identically), and a plot should not show them twice."""
    p = Path(path)
    if not p.is_file():
        return
    kept = [r for r in read_metrics(p) if r.get("step", 0) <= step]
    tmp = p.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    tmp.replace(p)
