"""Model FLOPs utilization (MFU): the share of the GPUs' dense bf16 peak that a training throughput reaches.

Model FLOPs per token are `summary.flops_per_token` (PaLM's accounting, the same for every strategy: scale
vectors add no matmul). `scalevec bench` and the trainer's log line both compute MFU here; off CUDA, or on a
card whose peak is not known, there is none.
"""

from __future__ import annotations

import torch

# Dense bf16 tensor-core peaks (datasheets, TFLOP/s), matched against torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "A10G": 70.0}


def peak_tflops(device: torch.device, given: float | None = None) -> float | None:
    """`given`, else the CUDA device's peak looked up by its name; None on CPU or for a card not in the table."""
    if given or device.type != "cuda":
        return given
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def mfu(flops_per_token: int, tokens_per_s: float, peak_tflops: float, devices: int = 1) -> float:
    """Model FLOPs per second over the peak of `devices` GPUs that together process `tokens_per_s`."""
    return flops_per_token * tokens_per_s / (peak_tflops * 1e12 * devices)
