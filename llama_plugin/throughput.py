"""Speed metrics: tokens/s, TFLOP/s per GPU and model FLOPs utilization (MFU).

MFU = (flops_per_token * tokens per second per device) / peak FLOP/s of one device, with
flops_per_token from flops.py (PaLM's 6N + 12LHQT). Peak figures are the dense bf16 tensor-core
numbers of the datasheets (no sparsity). On a CPU there is no datasheet figure for our purpose, so
the peak used is this process's measured fp32 matmul throughput, and the run config says so.
"""

from __future__ import annotations

import time

import torch

# Dense bf16 peak FLOP/s per device (NVIDIA datasheets, SXM parts).
DENSE_BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12}


def measure_cpu_matmul_flops(n: int = 1024, repeats: int = 5) -> float:
    """Median fp32 FLOP/s of an n x n matmul on this process's threads."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / sorted(times)[len(times) // 2]


def peak_flops_per_device(configured: float | None = None) -> tuple[float, str]:
    """(peak FLOP/s, where the figure comes from): the device actually present decides; the
    cluster's configured figure is used for GPUs missing from the table."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, peak in DENSE_BF16_PEAK.items():
            if key in name:
                return peak, f"{name}: dense bf16 datasheet peak"
        if configured:
            return float(configured), f"{name}: cluster.peak_flops_per_gpu"
        raise ValueError(f"cluster.peak_flops_per_gpu: unknown GPU {name!r}; set its dense bf16 peak FLOP/s")
    return measure_cpu_matmul_flops(), "CPU: measured fp32 1024x1024 matmul throughput of one process"


def speed_metrics(tokens: int, seconds: float, devices: int, flops_per_token: int, peak: float) -> dict:
    tokens_per_sec = tokens / seconds
    per_device = tokens_per_sec / devices
    achieved = per_device * flops_per_token
    return {
        "throughput/tokens_per_sec": tokens_per_sec,
        "throughput/tokens_per_sec_per_gpu": per_device,
        "throughput/tflops_per_gpu": achieved / 1e12,
        "throughput/mfu": achieved / peak,
    }
