"""Mask cleaning: from U-Net probabilities to one clean mask per class.

Per class (the paper's post-processing): threshold the sigmoid probability, label the connected
components (8-connectivity) and keep the component with the highest mean probability; then,
optionally, morphological opening / closing and hole filling. Morphology never empties a mask:
if it would, the component is kept as it was.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np


@dataclass
class CleaningConfig:
    """threshold: probability above which a pixel is foreground.
    opening_radius / closing_radius: radius in pixels of the elliptical structuring element (0 = off).
    fill_holes: fill holes fully enclosed by the kept component.
    """

    threshold: float = 0.5
    opening_radius: int = 0
    closing_radius: int = 0
    fill_holes: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def _disk(radius: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def best_component(prob: np.ndarray, threshold: float) -> np.ndarray:
    """bool (H, W): the connected component of prob > threshold with the highest mean probability.

    prob: float (H, W). Ties go to the larger component, then to the lower label. All False when no
    pixel exceeds the threshold.
    """
    return component_with_highest_mean(np.asarray(prob) > threshold, prob)


def component_with_highest_mean(foreground: np.ndarray, prob: np.ndarray) -> np.ndarray:
    """bool (H, W): the 8-connected component of bool ``foreground`` whose mean ``prob`` is highest."""
    fg = np.asarray(foreground).astype(np.uint8)
    n, labels = cv2.connectedComponents(fg, connectivity=8)
    if n <= 1:
        return np.zeros(fg.shape, dtype=bool)
    flat = labels.ravel()
    sums = np.bincount(flat, weights=np.asarray(prob, dtype=np.float64).ravel(), minlength=n)[1:]
    counts = np.bincount(flat, minlength=n)[1:]
    means = sums / counts
    order = np.lexsort((-counts, -means))  # primary: mean desc, then size desc
    return labels == (order[0] + 1)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """bool (H, W) with every background region not connected to the image border set to True."""
    m = mask.astype(np.uint8)
    h, w = m.shape
    padded = np.pad(m, 1)
    flood = padded.copy()
    ff_mask = np.zeros((h + 4, w + 4), np.uint8)
    cv2.floodFill(flood, ff_mask, (0, 0), 1)
    holes = flood[1:-1, 1:-1] == 0
    return mask.astype(bool) | holes


def clean_class_mask(prob: np.ndarray, cfg: CleaningConfig = CleaningConfig()) -> np.ndarray:
    """Clean one class: float (H, W) probability -> bool (H, W) mask."""
    mask = best_component(prob, cfg.threshold)
    if not mask.any():
        return mask
    out = mask.astype(np.uint8)
    if cfg.opening_radius > 0:
        out = cv2.morphologyEx(out, cv2.MORPH_OPEN, _disk(cfg.opening_radius))
    if cfg.closing_radius > 0:
        out = cv2.morphologyEx(out, cv2.MORPH_CLOSE, _disk(cfg.closing_radius))
    out = out.astype(bool)
    if cfg.fill_holes:
        out = fill_holes(out)
    if cfg.opening_radius > 0 and out.any():
        # opening can split the component: keep the part with the highest mean probability again
        out = component_with_highest_mean(out, prob)
    return out if out.any() else mask


def clean_masks(probs: np.ndarray, cfg: CleaningConfig = CleaningConfig()) -> np.ndarray:
    """Clean every class: float (C, H, W) probabilities -> bool (C, H, W) masks."""
    probs = np.asarray(probs)
    if probs.ndim != 3:
        raise ValueError(f"clean_masks: expected probabilities of shape (C, H, W), got {probs.shape}")
    return np.stack([clean_class_mask(p, cfg) for p in probs]) if len(probs) else probs.astype(bool)
