"""The MFU denominator: the bf16 dense matmul rate this GPU reaches, measured in the same run (the issue asks for MFU
against the measured peak, ~790 TFLOP/s on an H200, rather than the 989 TFLOP/s datasheet figure).

    python bench/peak.py          # prints the measured TFLOP/s
"""
from __future__ import annotations

import statistics

import torch

DATASHEET_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}


def measured_peak_tflops(size: int = 8192, repeats: int = 20) -> float:
    """Median TFLOP/s of a [size x size] @ [size x size] bf16 matmul over `repeats` CUDA-event timings."""
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / 1e3)
    return 2 * size ** 3 / statistics.median(times) / 1e12


def datasheet_tflops() -> float | None:
    name = torch.cuda.get_device_name()
    return next((v for k, v in DATASHEET_TFLOPS.items() if k in name), None)


def peak_tflops(requested: str) -> tuple[float, str]:
    """--peak-tflops: 'measure' (default on a GPU) or a number; returns (TFLOP/s, how it was obtained)."""
    if requested != "measure":
        return float(requested), "given"
    if not torch.cuda.is_available():
        return 1.0, "no GPU (MFU meaningless)"
    return measured_peak_tflops(), "measured bf16 8192^3 matmul"


if __name__ == "__main__":
    print(f"{torch.cuda.get_device_name()}: {measured_peak_tflops():.0f} TFLOP/s bf16 (datasheet {datasheet_tflops()})")
