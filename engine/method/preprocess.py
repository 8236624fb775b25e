"""Between an image's own grid and the U-Net's square input grid, keeping the aspect ratio.

Images enter plabel as gray uint8 (H, W) (see plabel.data.imageio). The U-Net sees float32 in
[0, 1] at image_size x image_size: the gray levels are first normalised as the model was trained
(:func:`normalise_intensity`, the U-Net's ``intensity``), then the image is scaled so that its longer side is image_size
(:func:`grid_shape`) and padded with zeros at the bottom and right, as SAM's ResizeLongestSide
does; a non-square radiograph (a 384 x 224 wrist film) is never stretched. The probabilities go
back by cropping the padding and resizing to (H, W) before cleaning, so masks, boxes and points
always live on the original pixel grid. Square images fill the grid: no padding, no crop.
"""
from __future__ import annotations

import cv2
import numpy as np


#: how gray levels reach the U-Net (UNetConfig.intensity, the run config's teacher / student `intensity`)
INTENSITIES = ("fixed", "minmax")


def normalise_intensity(gray: np.ndarray, intensity: str) -> np.ndarray:
    """gray uint8 (H, W) -> uint8 (H, W), the gray levels the U-Net (and SAM) are given.

    ``fixed``: unchanged (the U-Net reads gray / 255). ``minmax``: the image's darkest level goes to 0
    and its brightest to 255, linearly, rounded to the nearest level; an image with fewer than two
    levels is unchanged. minmax is idempotent, so applying it twice is harmless. Why: 5 of JSRT's
    200 radiographs are washed out (levels 239-254) and every U-Net read at gray / 255 predicted
    nothing on them (benchmarks/RESULTS.md, quality 2.0b).
    """
    if intensity not in INTENSITIES:
        raise ValueError(f"intensity must be one of {INTENSITIES}, got {intensity!r}")
    gray = np.asarray(gray)
    if intensity == "fixed" or gray.size == 0:
        return gray
    lo, hi = np.float64(gray.min()), np.float64(gray.max())
    if hi - lo < 1 or (lo, hi) == (0, 255):  # flat, or already full range: the mapping is the identity
        return gray  # (the label job normalises once for SAM, then to_unet_input again: the second pass is free)
    return np.round(np.clip((gray.astype(np.float64) - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def grid_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """(h, w) of an image of (height, width) inside the size x size grid: longer side = size."""
    scale = size / max(height, width)
    return max(1, int(round(height * scale))), max(1, int(round(width * scale)))


def _pad(a: np.ndarray, size: int) -> np.ndarray:
    """Zero-pad the last two axes of ``a`` at the bottom and right to (size, size)."""
    h, w = a.shape[-2:]
    if (h, w) == (size, size):
        return a
    pad = [(0, 0)] * (a.ndim - 2) + [(0, size - h), (0, size - w)]
    return np.pad(a, pad)


def to_unet_input(gray: np.ndarray, size: int, intensity: str) -> np.ndarray:
    """gray uint8 (H, W) -> float32 (size, size) in [0, 1]: :func:`normalise_intensity`, scaled to
    :func:`grid_shape` (area interpolation when shrinking, bilinear when enlarging), / 255,
    zero-padded bottom / right."""
    gray = np.asarray(gray)
    if gray.ndim != 2:
        raise ValueError(f"to_unet_input: expected a gray (H, W) image, got shape {gray.shape}")
    gray = normalise_intensity(gray, intensity)
    h, w = gray.shape
    gh, gw = grid_shape(h, w, size)
    interp = cv2.INTER_AREA if (h > gh or w > gw) else cv2.INTER_LINEAR
    out = gray if (h, w) == (gh, gw) else cv2.resize(gray, (gw, gh), interpolation=interp)
    return _pad(out.astype(np.float32) / 255.0, size)


def masks_to_grid(masks: np.ndarray, size: int) -> np.ndarray:
    """bool (C, H, W) -> uint8 (C, size, size) in {0, 1}: nearest neighbour onto :func:`grid_shape`,
    padding 0 (background), exactly where :func:`to_unet_input` puts the image."""
    masks = np.asarray(masks)
    c, h, w = masks.shape
    gh, gw = grid_shape(h, w, size)
    if (h, w) == (gh, gw):
        return _pad(masks.astype(np.uint8), size)
    out = np.stack([cv2.resize(m.astype(np.uint8), (gw, gh), interpolation=cv2.INTER_NEAREST) for m in masks])
    return _pad(out.reshape(c, gh, gw), size)


def probs_to_image(probs: np.ndarray, height: int, width: int) -> np.ndarray:
    """float32 (C, s, s) on the U-Net grid -> float32 (C, height, width): the padding cropped, then
    bilinear."""
    probs = np.asarray(probs, dtype=np.float32)
    if probs.shape[1:] == (height, width):
        return probs
    gh, gw = grid_shape(height, width, probs.shape[-1])
    valid = probs[:, :gh, :gw]
    return np.stack([cv2.resize(p, (width, height), interpolation=cv2.INTER_LINEAR) for p in valid]).reshape(
        probs.shape[0], height, width
    )
