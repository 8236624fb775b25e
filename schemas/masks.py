"""Lossless, compact mask encoding: 1 bit per pixel (np.packbits, row-major, big bit order)."""
from __future__ import annotations

import numpy as np


def encode_mask(mask: np.ndarray) -> bytes:
    """bool (H, W) -> bytes of ceil(H*W/8) packed bits."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"encode_mask: expected a 2-D mask, got shape {mask.shape}")
    return np.packbits(mask.astype(bool).ravel()).tobytes()


def decode_mask(data: bytes, height: int, width: int) -> np.ndarray:
    """bytes from encode_mask -> bool (height, width). Raises ValueError on a length mismatch."""
    n = int(height) * int(width)
    expected = (n + 7) // 8
    if data is None:
        return np.zeros((height, width), dtype=bool)
    if len(data) != expected:
        raise ValueError(
            f"decode_mask: {len(data)} bytes cannot hold a {height}x{width} mask (expected {expected})"
        )
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=n)
    return bits.reshape(height, width).astype(bool)
