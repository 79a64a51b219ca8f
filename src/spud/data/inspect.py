"""`spud data inspect RUN`: what the cleaning rules dropped and kept, so a user can read a rule's
effect before trusting it. Reads RUN/data/manifest.json (counts) and RUN/data/inspect.json (up to
20 documents per source and reason, written by the build)."""

from __future__ import annotations

import difflib
import json
from pathlib import Path

from spud.data.build import INSPECT_FILE
from spud.errors import SpudError


def inspect_cmd(run: str | Path, rule: str | None = None, n: int = 5, width: int = 400, console=None) -> dict:
    from spud.data.shards import load_manifest  # noqa: PLC0415
    from spud.ui import make_console  # noqa: PLC0415

    console = console or make_console()
    data = Path(run) / "data"
    manifest = load_manifest(run)
    path = data / INSPECT_FILE
    if not path.is_file():
        raise SpudError(f"{path} does not exist: the build of {run} had no cleaning rules or dedup "
                        "(set data.sources[i].clean.kind and/or data.dedup.exact/near, then rebuild)")
    try:
        samples = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise SpudError(f"{path} is not valid JSON ({e}); rebuild the data") from None
    reasons = sorted({r for s in samples.values() for r in s["dropped"]})
    if rule is not None:
        wanted = [r for r in reasons if r == rule or r.split(":", 1)[-1] == rule]
        if not wanted:
            close = difflib.get_close_matches(rule, reasons + [r.split(":", 1)[-1] for r in reasons], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SpudError(f"no document of {run} was dropped by {rule!r}{hint}; reasons with drops: "
                            f"{', '.join(reasons) or 'none'}")
        reasons = wanted
    counts = {r["name"]: r.get("skipped", {}) for r in manifest["sources"]}
    shown = {}
    for source, s in samples.items():
        for reason in reasons:
            docs = s["dropped"].get(reason, [])[:n]
            if not docs:
                continue
            console.rule(f"{source} · dropped by {reason} ({counts.get(source, {}).get(reason, len(docs)):,} documents)")
            for d in docs:
                console.print(f"[bold]{d['where']}[/] [yellow]{d['detail']}[/]")
                console.print(d["text"][:width].replace("\n", "⏎ "), markup=False, highlight=False)
            shown.setdefault(source, {})[reason] = len(docs)
        if rule is None and s["kept"]:
            console.rule(f"{source} · kept")
            for d in s["kept"][:n]:
                console.print(f"[bold]{d['where']}[/]")
                console.print(d["text"][:width].replace("\n", "⏎ "), markup=False, highlight=False)
    return {"reasons": reasons, "shown": shown}
