"""Applying a U-Net to new images (``plabel predict``), Ray-free: masks, their confidence, table rows.

``plabel evaluate`` scores exactly these masks (plabel.jobs.evaluate_job and
plabel.method.metrics.dice_of_probs call :func:`predicted_masks`), so a prediction table and an
evaluation of the same model agree.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from plabel.method.cleaning import CleaningConfig, clean_masks
from plabel.schemas.masks import encode_mask
from plabel.schemas.tables import PREDICTION_CLASS_FIELD_TYPES, class_column


def predicted_masks(probs: np.ndarray, threshold: float = 0.5, clean: bool = False) -> np.ndarray:
    """float (C, H, W) sigmoid probabilities -> bool (C, H, W): ``probs > threshold``, or with
    ``clean`` the cleaned masks at that threshold (plabel.method.cleaning.clean_masks)."""
    probs = np.asarray(probs)
    if clean:
        return clean_masks(probs, CleaningConfig(threshold=threshold))
    return probs > threshold


def mask_confidence(probs: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Mean probability inside each mask: float (C, H, W), bool (C, H, W) -> float32 (C,), NaN
    where a mask is empty."""
    area = masks.reshape(len(masks), -1).sum(1)
    inside = (np.asarray(probs) * masks).reshape(len(masks), -1).sum(1)
    return np.where(area > 0, inside / np.maximum(area, 1), np.nan).astype(np.float32)


def prediction_row(image: dict, masks: np.ndarray, confidence: np.ndarray, classes: Sequence[str]) -> dict:
    """One prediction-table row (plabel.schemas.tables.prediction_schema) of an image.

    image: the image-level columns (id, shard, key, height, width, message, unet_checkpoint_sha256);
    masks: bool (C, H, W); confidence: float32 (C,) (:func:`mask_confidence`). Status 'ok' when
    some class has a pixel, else 'empty'."""
    row = dict(image)
    row["status"] = "ok" if masks.any() else "empty"
    for ci, c in enumerate(classes):
        conf = float(confidence[ci])
        row[class_column(c, "mask")] = encode_mask(masks[ci])
        row[class_column(c, "area")] = int(masks[ci].sum())
        row[class_column(c, "unet_prob")] = conf if np.isfinite(conf) else None
    return row


def error_row(image: dict, message: str, classes: Sequence[str]) -> dict:
    """A prediction-table row with status 'error' (the message names the input) and no masks."""
    row = {**image, "status": "error", "message": message}
    for c in classes:
        for f in PREDICTION_CLASS_FIELD_TYPES:
            row[class_column(c, f)] = None
    return row
