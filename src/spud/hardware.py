"""Peak matmul throughput of the device a run uses: the denominator of MFU.

GPUs: a table of vendor-datasheet *dense* (no 2:4 sparsity) peaks, matched by a substring of
torch.cuda.get_device_name(). For float32 the right peak depends on whether fp32 matmuls may use
TF32 tensor cores, which torch decides from `torch.get_float32_matmul_precision()`: at "highest"
(PyTorch's default) they run on the plain FP32 units, so the non-tensor FP32 peak is the honest
denominator; at "high"/"medium" they use TF32, so the TF32 tensor-core peak is used. bf16/fp16
use the tensor-core peak with fp32 accumulation.

CPUs: datasheet numbers are meaningless for a laptop or a shared VM (turbo, SMT, AVX-512 width,
thread count all change them), so the peak is *measured*: the best rate of a square torch.mm over
about a second, cached per CPU model + thread count + dtype so it is paid once per machine.
A peak measured while other jobs held the cores is too low; the first run that does more model
FLOP/s than it raises the cached figure (`raise_cpu_peak`), so MFU never reads above 100 %.

Unknown accelerators give 0.0 ("no peak known") with a one-time warning rather than an error:
a missing MFU figure must never stop a training run. SPUD_PEAK_FLOPS=<float> overrides
everything (unknown accelerators, or to compare machines on a common denominator).
"""

from __future__ import annotations

import json
import os
import platform
import re
import time
import warnings
from pathlib import Path

import torch

from spud.errors import SpudError

# (model name, bf16/fp16 tensor, tf32 tensor, fp32 non-tensor) in FLOP/s, dense. A name matches
# as a whole word of the device name ("A40" must not match "RTX A4000"); more specific names come
# first ("H100 NVL" before "H100").
GPU_PEAKS: list[tuple[str, float, float, float]] = [
    ("GB200", 2500e12, 1250e12, 80e12),
    ("B200", 2250e12, 1100e12, 80e12),
    ("B100", 1750e12, 875e12, 60e12),
    ("GH200", 989e12, 494.7e12, 66.9e12),
    ("H200", 989e12, 494.7e12, 66.9e12),
    ("H100 NVL", 835e12, 417.5e12, 60e12),
    ("H100 PCIe", 756e12, 378e12, 51.2e12),
    ("H100", 989e12, 494.7e12, 66.9e12),  # SXM
    ("H800", 989e12, 494.7e12, 66.9e12),
    ("A100", 312e12, 156e12, 19.5e12),
    ("A800", 312e12, 156e12, 19.5e12),
    ("A10G", 70e12, 35e12, 31.2e12),
    ("A10", 125e12, 62.5e12, 31.2e12),
    ("L40S", 362e12, 183e12, 91.6e12),
    ("L40", 181e12, 90.5e12, 90.5e12),
    ("L4", 121e12, 60e12, 30.3e12),
    ("A6000 Ada", 182e12, 91e12, 91e12),
    ("RTX 6000 Ada", 182e12, 91e12, 91e12),
    ("A6000", 154.8e12, 77.4e12, 38.7e12),
    ("A40", 149.7e12, 74.8e12, 37.4e12),
    ("RTX 5090", 209.5e12, 104.8e12, 104.8e12),
    ("RTX 4090", 165.2e12, 82.6e12, 82.6e12),
    ("RTX 4080", 97.5e12, 48.7e12, 48.7e12),
    ("RTX 3090", 71e12, 35.6e12, 35.6e12),
    ("RTX 3080", 59.5e12, 29.8e12, 29.8e12),
    ("V100", 125e12, 15.7e12, 15.7e12),  # fp16 tensor cores; no bf16/TF32 units
    ("T4", 65e12, 8.1e12, 8.1e12),
    ("MI300X", 1307e12, 653.7e12, 163.4e12),
    ("MI250X", 383e12, 95.7e12, 95.7e12),
]

CACHE_FILE = "peak_flops.json"


def peak_flops(device: torch.device | str, dtype: torch.dtype = torch.float32) -> float:
    """Peak dense matmul FLOP/s of `device` for `dtype`; 0.0 when unknown (see module doc)."""
    override = os.environ.get("SPUD_PEAK_FLOPS")
    if override:
        try:
            return float(override)
        except ValueError:
            raise SpudError(f"SPUD_PEAK_FLOPS={override!r} is not a number (FLOP/s)") from None
    device = torch.device(device)
    if device.type == "cpu":
        return cpu_peak_flops(dtype)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        try:
            return gpu_peak_flops(name, dtype)
        except SpudError as e:
            _warn_once(str(e))
            return 0.0
    _warn_once(
        f"no peak FLOP/s known for device type {device.type!r}; MFU will not be reported "
        "(set SPUD_PEAK_FLOPS=<FLOP/s> to report it)"
    )
    return 0.0


_WARNED: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _WARNED:
        _WARNED.add(msg)
        warnings.warn(msg, stacklevel=3)


def gpu_peak_flops(name: str, dtype: torch.dtype) -> float:
    """Table lookup by whole-word model name inside the device name (case-insensitive)."""
    for key, half, tf32, fp32 in GPU_PEAKS:
        if re.search(rf"(?<![a-z0-9]){re.escape(key)}(?![a-z0-9])", name, re.IGNORECASE):
            if dtype in (torch.bfloat16, torch.float16):
                return half
            if dtype == torch.float32:
                return fp32 if torch.get_float32_matmul_precision() == "highest" else tf32
            raise SpudError(f"no peak FLOP/s for dtype {dtype} on {name}; use bf16/fp16/fp32")
    raise SpudError(
        f"GPU {name!r} is not in spud's peak-FLOP/s table (spud/hardware.py), so MFU "
        "is not reported; set SPUD_PEAK_FLOPS=<dense FLOP/s for your dtype> to report it"
    )


# --------------------------------------------------------------------------------------- CPU
def cache_dir() -> Path:
    env = os.environ.get("SPUD_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "spud"


def cpu_name() -> str:
    """CPU model string (e.g. 'AMD EPYC 9654'), so a cached peak never crosses machines."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def cpu_peak_flops(
    dtype: torch.dtype = torch.float32, seconds: float = 1.0, n: int = 1024
) -> float:
    """Measured matmul peak for the current thread count, read from / written to the cache."""
    key, path = _cache_key(dtype), cache_dir() / CACHE_FILE
    cache = _read_cache(path)
    if isinstance(cache.get(key), (int, float)) and cache[key] > 0:
        return float(cache[key])
    value = measure_matmul_flops(dtype=dtype, seconds=seconds, n=n)
    cache = _read_cache(path)  # re-read: another process may have written meanwhile
    cache[key] = value
    _write_cache(path, cache)
    return value


def raise_cpu_peak(observed: float, dtype: torch.dtype = torch.float32) -> float:
    """A run just did `observed` model FLOP/s, more than the cached peak: the cached figure was
    measured while other processes held the cores, and would report MFU above 100 % forever.
    Model FLOPs are work the CPU really did, so `observed` is a lower bound on the peak: re-measure
    once and keep the larger of the two (and of the old figure) in the cache."""
    key, path = _cache_key(dtype), cache_dir() / CACHE_FILE
    value = max(measure_matmul_flops(dtype=dtype), float(observed))
    cache = _read_cache(path)
    old = cache.get(key)
    cache[key] = max(value, float(old)) if isinstance(old, (int, float)) else value
    _write_cache(path, cache)
    return cache[key]


def _cache_key(dtype: torch.dtype) -> str:
    """CPU model + thread count + dtype: a cached peak never crosses machines or settings."""
    return f"{cpu_name()}|threads={torch.get_num_threads()}|{str(dtype).removeprefix('torch.')}"


def measure_matmul_flops(
    dtype: torch.dtype = torch.float32, seconds: float = 1.0, n: int = 1024
) -> float:
    """Best rate of an n×n×n torch.mm over ~`seconds` on the CPU with torch's thread count.

    The best (not mean) rate is taken because the question is what the hardware can do; noise
    from other processes only ever slows a run down.
    """
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    out = torch.empty(n, n, dtype=dtype)
    for _ in range(2):  # warm caches, thread pool and the BLAS kernel selection
        torch.mm(a, b, out=out)
    flop = 2.0 * n * n * n
    best = 0.0
    deadline = time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        dt = time.perf_counter() - t0
        best = max(best, flop / max(dt, 1e-9))
        if t0 + dt >= deadline:
            return best


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # missing or corrupt cache: just measure again


def _write_cache(path: Path, data: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)  # atomic: concurrent readers never see half a file
    except OSError:
        pass  # an unwritable cache only costs a re-measurement next time
