"""Which torch device a ``device: auto | cpu | cuda`` setting means, and which autocast precision an ``amp``
setting means on it (training and inference alike)."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when present, else the CPU; ``cuda`` without a CUDA device is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda but no CUDA device is available")
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU runs bfloat16 convolutions in hardware (AVX512-BF16 or AMX tiles).

    There oneDNN's bf16 kernels beat float32 (``benchmarks/bench_network.py --amp off bf16``: 1.6-1.8x per
    training step and 1.8-2.1x per forward pass of the CPU plans on 2 Zen 4 cores); elsewhere bf16 is
    emulated and slower, so ``amp: auto`` keeps float32.
    """
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private torch.cpu probes (torch >= 2.1)
    try:
        return any(bool(getattr(torch.cpu, name)()) for name in probes if hasattr(torch.cpu, name))
    except RuntimeError:
        return False


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``amp`` (``auto`` | ``bf16`` | ``fp16`` | ``off``) on ``device``; None: float32.

    CUDA: ``auto`` is bf16 where the GPU supports it, else fp16. CPU: ``auto`` is bf16 when the CPU has native
    bf16 (:func:`cpu_has_native_bf16`), ``bf16`` always; ``fp16`` is float32 on a CPU (no fast fp16 path).
    """
    if amp == "off":
        return None
    if device.type == "cuda":
        if amp == "bf16" or (amp == "auto" and torch.cuda.is_bf16_supported()):
            return torch.bfloat16
        return torch.float16
    if device.type == "cpu" and (amp == "bf16" or (amp == "auto" and cpu_has_native_bf16())):
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager:
    """``torch.autocast`` on ``device`` at ``dtype``; a no-op context for None (float32)."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
