"""Hardware profiles for planning: peak FLOP/s per precision, memory, bandwidth, price, MFU.

Defaults live in hardware_profiles.yaml next to this file; a user YAML (--hardware) is merged over
them entry by entry, so one can add a new accelerator or change only a price. The "cpu" entry is
this machine, measured lazily (only when asked for) because the measurement takes about a second.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from spud.errors import SpudError

DEFAULT_PROFILES = Path(__file__).with_name("hardware_profiles.yaml")
DEFAULT_MFU = 0.4


@dataclass
class HardwareProfile:
    name: str
    peak_flops: dict[str, float] = field(default_factory=dict)
    memory_gb: float = 0.0
    bandwidth_gbs: float = 0.0
    price_per_hour: float = 0.0
    mfu: float = DEFAULT_MFU

    @property
    def memory_bytes(self) -> float:
        return self.memory_gb * 1e9

    @property
    def bandwidth(self) -> float:
        """Bytes per second."""
        return self.bandwidth_gbs * 1e9

    def peak(self, precision: str = "bf16") -> float:
        """Peak FLOP/s at `precision`; a device without 16-bit tensor units falls back to fp32."""
        for key in (precision, "fp32"):
            if self.peak_flops.get(key):
                return float(self.peak_flops[key])
        raise SpudError(f"hardware profile {self.name!r} has no peak_flops for {precision} or fp32")

    def to_dict(self) -> dict:
        return asdict(self)


def _read(path: Path) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except OSError as e:
        raise SpudError(f"cannot read hardware profiles {path}: {e}") from None
    except yaml.YAMLError as e:
        raise SpudError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise SpudError(f"{path}: expected a mapping of name -> {{peak_flops, memory_gb, ...}}")
    return data


def load_profiles(path: str | Path | None = None) -> dict[str, dict]:
    """Raw profile mappings: the defaults, with `path`'s entries merged over them."""
    data = _read(DEFAULT_PROFILES)
    if path is not None:
        for name, entry in _read(Path(path)).items():
            merged = {**data.get(name, {}), **entry}
            if isinstance(entry.get("peak_flops"), dict):  # merge precisions, not replace all
                merged["peak_flops"] = {**data.get(name, {}).get("peak_flops", {}), **entry["peak_flops"]}
            data[name] = merged
    return data


def _cpu_fill(entry: dict) -> dict:
    entry = dict(entry)
    if not entry.get("peak_flops"):
        from spud.hardware import (
            cpu_peak_flops,  # imports torch; only when the CPU is asked for
        )

        entry["peak_flops"] = {"fp32": cpu_peak_flops()}
    if not entry.get("memory_gb"):
        try:
            entry["memory_gb"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
        except (ValueError, OSError, AttributeError):
            entry["memory_gb"] = 8.0
    return entry


def get_profile(name: str, path: str | Path | None = None) -> HardwareProfile:
    """Profile by name (case-insensitive)."""
    data = load_profiles(path)
    match = {k.lower(): k for k in data}.get(name.lower())
    if match is None:
        raise SpudError(f"unknown hardware {name!r}; known: {', '.join(data)} (add it with --hardware FILE)")
    entry = data[match]
    if match.lower() == "cpu":
        entry = _cpu_fill(entry)
    known = {"peak_flops", "memory_gb", "bandwidth_gbs", "price_per_hour", "mfu"}
    unknown = set(entry) - known
    if unknown:
        raise SpudError(f"hardware {match!r}: unknown keys {sorted(unknown)}; valid: {sorted(known)}")
    return HardwareProfile(
        name=match,
        peak_flops={k: float(v) for k, v in (entry.get("peak_flops") or {}).items()},
        memory_gb=float(entry.get("memory_gb") or 0.0),
        bandwidth_gbs=float(entry.get("bandwidth_gbs") or 0.0),
        price_per_hour=float(entry.get("price_per_hour") or 0.0),
        mfu=float(entry.get("mfu") or DEFAULT_MFU),
    )
