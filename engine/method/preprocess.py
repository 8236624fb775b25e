"""Resizing between an image's own grid and the U-Net's square input grid.

Images enter plabel as gray uint8 (H, W) (see plabel.data.imageio); the U-Net sees float32 in [0, 1]
at image_size x image_size; its probabilities go back to (H, W) before cleaning, so masks, boxes
and points always live on the original pixel grid.
"""
from __future__ import annotations

import cv2
import numpy as np


def to_unet_input(gray: np.ndarray, size: int) -> np.ndarray:
    """gray uint8 (H, W) -> float32 (size, size) in [0, 1] (area interpolation when shrinking)."""
    gray = np.asarray(gray)
    if gray.ndim != 2:
        raise ValueError(f"to_unet_input: expected a gray (H, W) image, got shape {gray.shape}")
    h, w = gray.shape
    interp = cv2.INTER_AREA if (h > size or w > size) else cv2.INTER_LINEAR
    out = gray if (h, w) == (size, size) else cv2.resize(gray, (size, size), interpolation=interp)
    return out.astype(np.float32) / 255.0


def masks_to_grid(masks: np.ndarray, size: int) -> np.ndarray:
    """bool (C, H, W) -> uint8 (C, size, size) in {0, 1} (nearest neighbour)."""
    masks = np.asarray(masks)
    if masks.shape[1:] == (size, size):
        return masks.astype(np.uint8)
    return np.stack(
        [cv2.resize(m.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST) for m in masks]
    ).reshape(masks.shape[0], size, size)


def probs_to_image(probs: np.ndarray, height: int, width: int) -> np.ndarray:
    """float32 (C, s, s) -> float32 (C, height, width), bilinear."""
    probs = np.asarray(probs, dtype=np.float32)
    if probs.shape[1:] == (height, width):
        return probs
    return np.stack([cv2.resize(p, (width, height), interpolation=cv2.INTER_LINEAR) for p in probs]).reshape(
        probs.shape[0], height, width
    )
