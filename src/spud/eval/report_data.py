"""The report card's data section, from `data/manifest.json` (and a mixture search, if any).

Per source: the mix (weight, share of tokens, epochs), what was read (documents, bytes, tokens),
and what cleaning removed — each quality rule and each kind of duplicate, as documents, share of
the source's records, and bytes — so a reader sees what the model trained on and what it did not.

A mixture search (`spud mix search ... --out RUN/mix`) is shown when its outputs are in `RUN/mix/`
(mix.json and predicted_vs_actual.png): the place to put it for the run trained with its weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from spud.eval.report_plots import plot_data_mix

MIX_DIR = "mix"  # RUN/mix/: where the report looks for `spud mix search` outputs


def _num(v) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else 0.0


def _mb(v) -> str:
    return f"{_num(v) / 1e6:.2f}"


def data_section(run: Path, manifest: dict | None, out: Path) -> list[str]:
    """Markdown lines of the "Data" section; `out` is RUN/report/ (plots are written there)."""
    from spud.eval.report import _fmt, _img, _table  # noqa: PLC0415 - no cycle at import

    md = ["## Data mix", ""]
    if not manifest:
        return md + ["_No data/manifest.json in the run directory._", ""]
    sources = manifest.get("sources") or []
    md += _img(plot_data_mix(sources, out), "tokens per source", "The manifest lists no sources.")
    total = sum(_num(s.get("train_tokens")) + _num(s.get("val_tokens")) for s in sources) or 1
    md += _table(
        ["source", "weight", "share", "epochs", "documents", "MB read", "train tokens", "val tokens"],
        [[s.get("name"), _fmt(s.get("weight")),
          f"{(_num(s.get('train_tokens')) + _num(s.get('val_tokens'))) / total:.1%}", _fmt(s.get("epochs")),
          _fmt(s.get("documents")), _mb(s.get("bytes")), _fmt(s.get("train_tokens")), _fmt(s.get("val_tokens"))]
         for s in sources])
    md.append("")
    md += _cleaning(sources, manifest.get("data_config") or {}, _table)
    md += _mix_search(run, out, _fmt, _table)
    return md


def _removed_bytes(source: dict, reason: str):
    cleaning = source.get("cleaning") or {}
    kind, _, name = reason.partition(":")
    if kind == "quality":
        return (cleaning.get("quality") or {}).get(name, {}).get("bytes")
    if kind == "duplicate":
        return ((cleaning.get("dedup") or {}).get(name) or {}).get("bytes")
    return None


def _cleaning(sources: list[dict], data_config: dict, table) -> list[str]:
    """One row per (source, reason) that removed anything: quality rules, duplicates, and the
    reader's own skips (empty, not text, invalid JSON ...)."""
    rows = []
    for s in sources:
        records = _num(s.get("records")) or 1
        for reason, n in sorted((s.get("skipped") or {}).items()):
            nbytes = _removed_bytes(s, reason)
            rows.append([s.get("name"), reason, f"{int(n):,}", f"{n / records:.1%}",
                         _mb(nbytes) if nbytes is not None else "—"])
    dedup = data_config.get("dedup") or {}
    on = [k for k in ("exact", "near") if dedup.get(k)]
    how = (f"dedup: {' + '.join(on)}" + (f" (Jaccard ≥ {dedup.get('threshold')}, {dedup.get('ngram')}-word "
                                           f"shingles)" if dedup.get("near") else "")) if on else "dedup: off"
    rules = ", ".join(f"{s.get('name')}: {((s.get('cleaning') or {}) and 'rules') or 'none'}" for s in sources)
    md = ["### Cleaning", "", f"_{how}; quality rules per source — {rules}. Rates are shares of each "
          "source's records on its first pass (`spud data inspect RUN` shows examples)._", ""]
    if not rows:
        return md + ["_Nothing was removed._", ""]
    return md + table(["source", "removed as", "documents", "of records", "MB"], rows) + [""]


def _mix_search(run: Path, out: Path, fmt, table) -> list[str]:
    path = run / MIX_DIR / "mix.json"
    if not path.is_file():
        return []
    try:
        mix = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ["### Mixture search", "", f"_{path} is unreadable._", ""]
    md = ["### Mixture search", "",
          f"_`spud mix search` ({MIX_DIR}/): {fmt(mix.get('proxies'))} proxies, regressor "
          f"{mix.get('regressor')}, out-of-fold Spearman ρ = {fmt(mix.get('cv_spearman'))}, "
          f"targets {', '.join(mix.get('targets') or [])}._", ""]
    weights, natural = mix.get("weights") or {}, mix.get("natural") or {}
    md += table(["source", "natural", "searched"],
                [[k, fmt(natural.get(k)), fmt(w)] for k, w in weights.items()]) + [""]
    plot = run / MIX_DIR / "predicted_vs_actual.png"
    if plot.is_file():
        shutil.copyfile(plot, out / "mix_predicted_vs_actual.png")
        md += ["![mixture search: predicted vs actual](report/mix_predicted_vs_actual.png)", ""]
    return md
