"""Numeric precision of training and inference: what ``auto`` means on a device, and the autocast for it."""

from __future__ import annotations

import contextlib
import platform

import torch

from .errors import SimmimError


def cpu_supports_bf16() -> bool:
    """bf16 matrix instructions (AVX512-BF16 or AMX) make bf16 autocast worth it on a CPU."""
    return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
                or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def gpu_has_native_bf16(device: torch.device) -> bool:
    """Ampere (compute capability 8.0) and newer have bf16 tensor cores; ``torch.cuda.is_bf16_supported()`` also
    counts the slow emulation of older GPUs (V100, T4)."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def emulated_bf16_warning(precision: str, device: torch.device) -> str | None:
    """A warning line where bf16 was asked for on hardware that only emulates it (a CPU without AVX512-BF16/AMX,
    a GPU older than Ampere), where a step runs many times slower than in fp32; None elsewhere."""
    if precision != "bf16":
        return None
    # x86 only: cpu_supports_bf16 knows x86's bf16 instructions, not Arm's (Graviton3 and newer have them)
    if device.type == "cpu" and platform.machine().lower() in ("x86_64", "amd64") and not cpu_supports_bf16():
        hardware, instead = "this CPU has no bf16 instructions (AVX512-BF16 or AMX)", "fp32"
    elif device.type == "cuda" and not gpu_has_native_bf16(device):
        hardware, instead = f"{torch.cuda.get_device_name(device)} has no bf16 tensor cores", "fp16"
    else:
        return None
    return (f"warning: {hardware}: bf16 is emulated and a step runs many times slower; drop --precision bf16 "
            f"(auto picks {instead} here)")


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` → bf16 where the device has it (recent GPUs, CPUs with bf16 instructions), fp16 on older GPUs,
    fp32 on other CPUs."""
    if precision != "auto":
        if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise SimmimError("this GPU has no bf16; use --precision fp16 (with loss scaling) or fp32")
        return precision
    if device.type == "cuda":
        return "bf16" if gpu_has_native_bf16(device) else "fp16"
    return "bf16" if cpu_supports_bf16() else "fp32"


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
