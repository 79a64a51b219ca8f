"""Run planning: hardware peaks (for MFU) and, later, sizing a run to a compute budget."""

from spud.plan.hardware import cpu_peak_flops, gpu_peak_flops, peak_flops

__all__ = ["cpu_peak_flops", "gpu_peak_flops", "peak_flops"]
