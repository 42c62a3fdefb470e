"""How much of the device a run uses: training FLOPs per image (counted once), the device's dense peak, MFU.

MFU (model FLOPs utilisation) = FLOPs per image × images per second ÷ the device's dense peak for the precision
trained in. FLOPs are counted by ``torch.utils.flop_counter`` on a copy of the model on the meta device (no
memory, no compute), forward and backward of one real-shaped batch; the same pass shows which parameters never
get a gradient.
"""

from __future__ import annotations

import contextlib
import copy
import random
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

# Dense (no sparsity) tensor-core peaks in TFLOP/s for bf16/fp16, from the vendors' data sheets; TF32 (fp32
# training on these GPUs) is half. Longest names first, so "H100 PCIe" is found before "H100".
GPU_PEAK_TFLOPS = {
    "GB200": 2450.0, "B200": 2250.0, "H200": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0,
    "H800": 989.0, "GH200": 989.0, "L40S": 362.0, "L40": 181.0, "A100": 312.0, "A800": 312.0, "A40": 150.0,
    "A30": 165.0, "A10G": 70.0, "A10": 125.0, "L4": 121.0, "RTX 6000 Ada": 364.0, "RTX 4090": 165.0,
    "RTX 3090": 71.0, "V100": 125.0, "T4": 65.0,
}


def gpu_peak_flops(name: str, precision: str) -> float | None:
    """The dense peak of a GPU by its ``torch.cuda.get_device_name``; None when it is not in the table."""
    for key in sorted(GPU_PEAK_TFLOPS, key=len, reverse=True):
        if key.lower() in name.lower():
            return GPU_PEAK_TFLOPS[key] * 1e12 / (2 if precision == "fp32" else 1)
    return None


def matmul_peak(dtype: torch.dtype = torch.bfloat16, size: int = 1024, seconds: float = 0.5,
                device: torch.device | str = "cpu") -> float:
    """FLOP/s of a large matmul on ``device``, the best of the rounds that fit in ``seconds``."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    a @ b
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        (a @ b).sum().item()  # .item() waits for the device
        best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return best


def device_peak_flops(device: torch.device, precision: str, seconds: float = 0.5) -> float | None:
    """The table's peak for a known GPU; on a CPU a measured matmul peak in the training precision."""
    if device.type == "cuda":
        return gpu_peak_flops(torch.cuda.get_device_name(device), precision)
    if device.type == "cpu":
        return matmul_peak(torch.bfloat16 if precision == "bf16" else torch.float32, seconds=seconds)
    return None


def raised_peak(peak: float, achieved: float, device: torch.device, precision: str) -> float:
    """The peak to divide by once a run has achieved more FLOP/s than ``peak``: on a CPU the matmul is timed
    again (the first timing may have run while other jobs loaded the machine), and the peak is never below what
    the run achieved, so MFU cannot exceed 1. A GPU's table peak is a data sheet's; exceeding it means the table
    named the wrong part (e.g. a PCIe card as its SXM sibling), and the achieved rate stands in for it."""
    if device.type == "cpu":
        peak = max(peak, device_peak_flops(device, precision, seconds=0.2) or 0.0)
    return max(peak, achieved)


@contextlib.contextmanager
def _untouched_random_state():
    """Whatever runs inside draws random numbers without changing any generator the run uses."""
    saved = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` on the meta device, made without copying its tensors (a big model is not doubled in
    memory, not even for a moment)."""
    memo: dict[int, Any] = {}
    for parameter in model.parameters():
        memo[id(parameter)] = nn.Parameter(torch.empty_like(parameter, device="meta"), parameter.requires_grad)
    for buffer in model.buffers():
        memo[id(buffer)] = torch.empty_like(buffer, device="meta")
    return copy.deepcopy(model, memo)


def count_training_flops(
    model: nn.Module, batch: dict[str, Any], step: Callable[[nn.Module, dict[str, Any]], torch.Tensor]
) -> tuple[float | None, list[str]]:
    """(training FLOPs per image, names of trainable parameters that get no gradient) for ``step(model, batch)``
    → loss, run forward and backward on a meta-device copy. (None, []) when the model cannot run on the meta
    device (some operation needs real values)."""
    meta_model = meta_copy(model)
    meta_batch = {k: v.to("meta") if torch.is_tensor(v) else v for k, v in batch.items()}
    images = len(next(v for v in batch.values() if torch.is_tensor(v)))
    try:
        with _untouched_random_state(), FlopCounterMode(display=False) as counter:
            step(meta_model, meta_batch).backward()
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        return None, []
    unused = [name for name, p in meta_model.named_parameters() if p.requires_grad and p.grad is None]
    return counter.get_total_flops() / images, unused
