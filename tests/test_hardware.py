import json

import pytest
import torch

from spud.errors import SpudError
from spud import hardware
from spud.hardware import gpu_peak_flops, peak_flops


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SPUD_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("SPUD_PEAK_FLOPS", raising=False)
    return tmp_path


def test_cpu_peak_is_measured_once_then_cached(cache_dir, monkeypatch):
    calls = []
    real = hardware.measure_matmul_flops

    def measure(**kw):
        calls.append(kw)
        return real(dtype=kw["dtype"], seconds=0.05, n=128)

    monkeypatch.setattr(hardware, "measure_matmul_flops", measure)
    first = peak_flops(torch.device("cpu"), torch.float32)
    assert first > 1e8 and len(calls) == 1
    data = json.loads((cache_dir / "peak_flops.json").read_text())
    (key,) = data
    assert f"threads={torch.get_num_threads()}" in key and key.endswith("float32")
    assert hardware.cpu_name() in key
    assert peak_flops("cpu") == first and len(calls) == 1  # second call reads the cache


def test_corrupt_cache_is_remeasured(cache_dir, monkeypatch):
    (cache_dir / "peak_flops.json").write_text("{not json")
    monkeypatch.setattr(hardware, "measure_matmul_flops", lambda **kw: 123.0)
    assert peak_flops("cpu") == 123.0
    assert 123.0 in json.loads((cache_dir / "peak_flops.json").read_text()).values()


def test_measure_matmul_flops_is_positive():
    assert hardware.measure_matmul_flops(seconds=0.02, n=64) > 0


def test_env_override(monkeypatch):
    monkeypatch.setenv("SPUD_PEAK_FLOPS", "1.5e12")
    assert peak_flops("cpu") == 1.5e12
    monkeypatch.setenv("SPUD_PEAK_FLOPS", "fast")
    with pytest.raises(SpudError, match="SPUD_PEAK_FLOPS"):
        peak_flops("cpu")


def test_gpu_table(monkeypatch):
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3", torch.bfloat16) == 989e12
    assert gpu_peak_flops("NVIDIA H100 PCIe", torch.bfloat16) == 756e12
    assert gpu_peak_flops("NVIDIA H200", torch.bfloat16) == 989e12
    assert gpu_peak_flops("NVIDIA A100-SXM4-80GB", torch.bfloat16) == 312e12
    assert gpu_peak_flops("NVIDIA A10G", torch.bfloat16) == 70e12
    assert gpu_peak_flops("NVIDIA B200", torch.bfloat16) == 2250e12
    assert gpu_peak_flops("NVIDIA L4", torch.float16) == 121e12
    assert gpu_peak_flops("NVIDIA GeForce RTX 4090", torch.bfloat16) == 165.2e12
    # fp32: plain FP32 units at torch's default precision, TF32 tensor cores when allowed
    prev = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert gpu_peak_flops("NVIDIA H100 80GB HBM3", torch.float32) == 66.9e12
        torch.set_float32_matmul_precision("high")
        assert gpu_peak_flops("NVIDIA H100 80GB HBM3", torch.float32) == 494.7e12
    finally:
        torch.set_float32_matmul_precision(prev)
    with pytest.raises(SpudError, match="SPUD_PEAK_FLOPS"):
        gpu_peak_flops("NVIDIA RTX A4000", torch.bfloat16)  # must not match "A40"


def test_unknown_device_gives_zero_not_an_error(monkeypatch):
    monkeypatch.delenv("SPUD_PEAK_FLOPS", raising=False)
    monkeypatch.setattr(hardware, "_WARNED", set())
    with pytest.warns(UserWarning, match="SPUD_PEAK_FLOPS"):
        assert peak_flops(torch.device("meta")) == 0.0
