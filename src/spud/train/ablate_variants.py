"""What `spud ablate` compares: variants from --vary lists (their cartesian product) or from a YAML
file of named override sets, and FLOP budgets. Keys that would break "same data, same tokenizer,
same seeds" (or that the ablation sets itself) cannot be varied."""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from spud.config import _merge, parse_overrides
from spud.errors import SpudError

# Keys an ablation must not vary: they would break "same data, same tokenizer, same seeds", or
# are set by the ablation itself.
FIXED_KEYS = {
    "data": "every variant trains on the same data (build another ablation for another mix)",
    "tokenizer": "every variant uses the same tokenizer",
    "seed": "seeds are set by --seeds (the same seeds for every variant)",
    "train.max_steps": "steps follow from --flops",
    "train.parallel": "ablation runs are single-process",
    "sft": "an ablation compares pretraining recipes",
}


@dataclass
class Variant:
    name: str
    overrides: dict[str, Any]  # nested tree merged over the base recipe

    @property
    def dirname(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.,=+-]+", "_", self.name)[:120]


# ------------------------------------------------------------------------------------ parsing
def _split_values(text: str) -> list[str]:
    """'a,b,[1,2]' → ['a', 'b', '[1,2]']: commas inside brackets or braces do not split."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    out.append(cur)
    return [v.strip() for v in out]


def _check_key(key: str, where: str) -> None:
    for fixed, why in FIXED_KEYS.items():
        if key == fixed or key.startswith(fixed + "."):
            raise SpudError(f"{where}: {key} cannot be varied: {why}")


def _flatten(tree: dict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in tree.items():
        keys += _flatten(v, f"{prefix}{k}.") if isinstance(v, dict) and v else [f"{prefix}{k}"]
    return keys


def parse_vary(items: list[str]) -> list[Variant]:
    """--vary KEY=V1,V2 (repeatable) → the cartesian product, named 'k=v,k2=v2'."""
    axes: list[tuple[str, list[str]]] = []
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise SpudError(f"--vary {item!r}: expected KEY=VALUE1,VALUE2 (e.g. model.mlp=swiglu,relu2)")
        _check_key(key, f"--vary {key}")
        vals = _split_values(values)
        if "" in vals or len(set(vals)) != len(vals):
            raise SpudError(f"--vary {item!r}: values must be non-empty and distinct")
        if key in (k for k, _ in axes):
            raise SpudError(f"--vary {key} is given twice; list all its values in one --vary")
        axes.append((key, vals))
    short = {k: k.rsplit(".", 1)[-1] for k, _ in axes}
    if len(set(short.values())) < len(short):  # e.g. train.lr and sft.lr: keep full keys
        short = {k: k for k in short}
    variants = []
    for combo in itertools.product(*(vals for _, vals in axes)):
        pairs = [(k, v) for (k, _), v in zip(axes, combo)]
        name = ",".join(f"{short[k]}={v}" for k, v in pairs)
        variants.append(Variant(name, parse_overrides([f"{k}={v}" for k, v in pairs])))
    return variants


def load_variants_file(path: str | Path) -> list[Variant]:
    """A YAML file of named variants: either a mapping NAME: {overrides} or a list of
    {name: NAME, overrides: {...}}. Override keys may be nested or dotted (model.mlp)."""
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise SpudError(f"--variants {p}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise SpudError(f"--variants {p}: not valid YAML: {e}") from None
    if isinstance(raw, dict) and set(raw) == {"variants"}:
        raw = raw["variants"]
    if isinstance(raw, dict):
        raw = [{"name": k, "overrides": v} for k, v in raw.items()]
    if not isinstance(raw, list) or not raw:
        raise SpudError(f"--variants {p}: expected a mapping NAME: {{overrides}} or a list of "
                        "{name, overrides} items")
    variants = []
    for i, item in enumerate(raw):
        where = f"--variants {p}, variant {i + 1}"
        if not isinstance(item, dict) or not isinstance(item.get("name"), (str, int, float)):
            raise SpudError(f"{where}: needs a 'name'")
        over = item.get("overrides") or {}
        if not isinstance(over, dict) or set(item) - {"name", "overrides"}:
            raise SpudError(f"{where} ({item.get('name')}): only 'name' and 'overrides' (a mapping) are allowed")
        tree: dict = {}
        for key, value in over.items():  # dotted keys become nested ones
            node = tree
            *parents, last = str(key).split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[last] = _merge(node.get(last), value, "") if isinstance(value, dict) else value
        for key in _flatten(tree):
            _check_key(key, f"{where} ({item['name']})")
        variants.append(Variant(str(item["name"]), tree))
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise SpudError(f"--variants {p}: variant names must be unique")
    return variants


def parse_flops(text: str) -> list[float]:
    """'2e13' or '5e12,1e13,2e13' → budgets (positive, finite)."""
    budgets = []
    for item in (t.strip() for t in str(text).split(",")):
        try:
            value = float(item)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value <= 0:
            raise SpudError(f"--flops {item!r} is not a positive number of training FLOPs (e.g. 2e13)")
        budgets.append(value)
    return sorted(set(budgets))
