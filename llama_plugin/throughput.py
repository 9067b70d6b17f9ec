"""Speed metrics: tokens/s, TFLOP/s per GPU and model FLOPs utilization (MFU).

MFU = (flops_per_token * tokens per second per device) / peak FLOP/s of one device, with
flops_per_token from flops.py (PaLM's 6N + 12LHQT). Peak figures are the dense bf16 tensor-core
numbers of the datasheets (no sparsity), matched by the device's exact name; a configured
`cluster.peak_flops_per_gpu` always wins. On a CPU there is no datasheet figure for our purpose, so
the peak used is this process's measured fp32 matmul throughput, and the run config says so.
"""

from __future__ import annotations

import re
import time
import warnings

import torch

# Dense (no sparsity) bf16 tensor-core peak FLOP/s, by the exact name CUDA reports
# (torch.cuda.get_device_name; the memory size may vary). Datasheets mostly print the figure "with
# sparsity"; the dense one is half of it. (pattern, peak, source)
DENSE_BF16_PEAKS = [
    (r"NVIDIA A100-SXM4?-(40|80)GB", 312e12, "NVIDIA A100 datasheet: 312 TFLOPS bf16 (SXM)"),
    (r"NVIDIA A100-PCIE-(40|80)GB|NVIDIA A100 80GB PCIe", 312e12, "NVIDIA A100 datasheet: 312 TFLOPS bf16 (PCIe)"),
    (r"NVIDIA A800-SXM4-(40|80)GB|NVIDIA A800 80GB PCIe", 312e12, "NVIDIA A800 datasheet: 312 TFLOPS bf16"),
    (r"NVIDIA H100 80GB HBM3|NVIDIA H100 SXM5 (64|80|94)GB", 989.4e12,
     "NVIDIA H100 datasheet: 1,979 TFLOPS bf16 with sparsity (SXM)"),
    (r"NVIDIA H100 PCIe", 756e12, "NVIDIA H100 datasheet: 1,513 TFLOPS bf16 with sparsity (PCIe)"),
    (r"NVIDIA H100 NVL", 835.5e12, "NVIDIA H100 datasheet: 1,671 TFLOPS bf16 with sparsity (NVL)"),
    (r"NVIDIA H800( 80GB HBM3)?", 989.4e12, "NVIDIA H800 SXM: as H100 SXM, 1,979 TFLOPS with sparsity"),
    (r"NVIDIA H200", 989.4e12, "NVIDIA H200 datasheet: 1,979 TFLOPS bf16 with sparsity (SXM)"),
    (r"NVIDIA H200 NVL", 835.5e12, "NVIDIA H200 datasheet: 1,671 TFLOPS bf16 with sparsity (NVL)"),
    (r"NVIDIA GH200 (96|120|144|480)GB( HBM3e?)?|NVIDIA GH200 144G HBM3e", 989.4e12,
     "NVIDIA GH200 datasheet: 1,979 TFLOPS bf16 with sparsity"),
    (r"NVIDIA B200", 2250e12, "NVIDIA HGX B200: 4.5 PFLOPS bf16 with sparsity per GPU"),
    (r"NVIDIA L40S", 362.05e12, "NVIDIA L40S datasheet: 362.05 TFLOPS bf16 (733 with sparsity)"),
    (r"NVIDIA L40", 181.05e12, "NVIDIA L40 datasheet: 181.05 TFLOPS bf16 (362.1 with sparsity)"),
    (r"NVIDIA L4", 121e12, "NVIDIA L4 datasheet: 242 TFLOPS bf16 with sparsity"),
    (r"NVIDIA A40", 149.7e12, "NVIDIA A40 datasheet: 149.7 TFLOPS bf16 (299.4 with sparsity)"),
    (r"NVIDIA A10", 125e12, "NVIDIA A10 datasheet: 125 TFLOPS bf16 (250 with sparsity)"),
]


def dense_bf16_peak(device_name: str) -> tuple[float, str] | None:
    """(peak, source) for a device name CUDA reports, or None: names match whole, never by part
    ("NVIDIA RTX A1000" is not an A100, "NVIDIA H100 PCIe" not an H100 SXM)."""
    name = device_name.strip()
    for pattern, peak, source in DENSE_BF16_PEAKS:
        if re.fullmatch(pattern, name):
            return peak, f"{name}: {source}"
    return None


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


def peak_flops_per_device(configured: float | None = None, device_name: str | None = None) -> tuple[float | None, str]:
    """(peak FLOP/s of one device, where the figure comes from). A configured
    `cluster.peak_flops_per_gpu` always wins; else the table for a GPU, the measured matmul rate on
    a CPU. An unknown GPU gives (None, why) and a warning: the run goes on without MFU."""
    if configured:
        return float(configured), "cluster.peak_flops_per_gpu"
    if device_name is None and torch.cuda.is_available():
        device_name = torch.cuda.get_device_name()
    if device_name is None:
        return measure_cpu_matmul_flops(), "CPU: measured fp32 1024x1024 matmul throughput of one process"
    found = dense_bf16_peak(device_name)
    if found:
        return found
    why = (f"{device_name}: not in llama_plugin/throughput.py's table; set cluster.peak_flops_per_gpu to its dense "
           f"bf16 peak FLOP/s for MFU")
    warnings.warn(why)
    return None, why


def speed_metrics(tokens: int, seconds: float, devices: int, flops_per_token: int, peak: float | None) -> dict:
    """Speed figures; MFU only when the peak is known."""
    tokens_per_sec = tokens / seconds
    per_device = tokens_per_sec / devices
    achieved = per_device * flops_per_token
    out = {
        "throughput/tokens_per_sec": tokens_per_sec,
        "throughput/tokens_per_sec_per_gpu": per_device,
        "throughput/tflops_per_gpu": achieved / 1e12,
    }
    if peak:
        out["throughput/mfu"] = achieved / peak
    return out
