"""Training precision: bf16 autocast where the hardware computes bf16 natively, else fp32.

On CPUs with AVX-512 BF16 (``avx512_bf16`` / ``amx_bf16`` in /proc/cpuinfo) a U-Net epoch at 256 px
ran 1.3x faster under bf16 autocast, 1.6-2.1x with channels_last too (benchmarks/RESULTS.md,
section 10), but the bf16 teachers measured there scored lower, so the config's default is fp32; on
AVX2-only CPUs bf16 is emulated and slower, so ``auto`` keeps fp32 there. Weights, optimiser state,
the loss and validation stay fp32: only the forward passes of a training step are autocast.
"""
from __future__ import annotations

import contextlib
import functools

import torch

PRECISIONS = ("auto", "fp32", "bf16")


@functools.lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """True when this machine's CPU flags include avx512_bf16 or amx_bf16 (Linux /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool({"avx512_bf16", "amx_bf16"} & flags)
    except OSError:
        pass
    return False


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """'fp32' or 'bf16' for ``precision`` (one of PRECISIONS) on ``device``: auto is bf16 on a CUDA
    device that supports it and on a CPU with native bf16 (:func:`cpu_has_bf16`), else fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and cpu_has_bf16() else "fp32"


def autocast(precision: str, device: torch.device | str):
    """The context of a forward pass: bf16 autocast for a resolved 'bf16', nothing for 'fp32'."""
    if precision == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
