"""Prompt extraction: from cleaned class masks to SAM prompts (box, positive point, negatives).

For every class with a non-empty cleaned mask we take
  * the bounding box of the mask (x0, y0, x1, y1), pixel coordinates, inclusive;
  * one positive point inside the class's *non-overlapping* area (pixels of this class that no
    other class covers): its centroid if the centroid lies inside that area, else the interior
    point farthest from the area's boundary (distance transform maximum);
  * as negatives, the positive points of all other present classes.

Coordinates are (x, y) in the pixel grid of the mask, as segment-anything expects.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass
class RefinementPrompts:
    """Prompts of one image, all classes at once.

    boxes:        float32 (C, 4) xyxy in original image pixels; rows of absent classes are 0.
    points:       float32 (C, P, 2) xy; row c holds class c's positive point first, then negatives.
    point_labels: int32   (C, P): 1 positive, 0 negative, -1 padding (ragged lists).
    valid:        bool    (C,) True where the class has a prompt (non-empty cleaned mask).
    """

    boxes: np.ndarray
    points: np.ndarray
    point_labels: np.ndarray
    valid: np.ndarray

    @property
    def num_classes(self) -> int:
        return int(self.valid.shape[0])


def mask_box(mask: np.ndarray) -> np.ndarray:
    """Bounding box of a non-empty bool mask (H, W) as float32 [x0, y0, x1, y1] (inclusive pixels)."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        raise ValueError("mask_box: empty mask")
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float32)


def interior_point(mask: np.ndarray) -> np.ndarray:
    """A point inside a non-empty bool mask (H, W), float32 [x, y].

    The centroid when the (rounded) centroid pixel lies inside the mask; otherwise the pixel
    farthest from the mask boundary (ties: first in row-major order).
    """
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        raise ValueError("interior_point: empty mask")
    cx, cy = float(xs.mean()), float(ys.mean())
    ix, iy = int(round(cx)), int(round(cy))
    if mask[iy, ix]:
        return np.array([cx, cy], dtype=np.float32)
    padded = np.pad(mask.astype(np.uint8), 1)  # border counts as outside
    dist = cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]
    flat = int(np.argmax(dist))
    y, x = divmod(flat, mask.shape[1])
    return np.array([x, y], dtype=np.float32)


def positive_point(masks: np.ndarray, c: int) -> np.ndarray:
    """Positive point of class c from stacked bool masks (C, H, W).

    Chosen inside class c's non-overlapping area; if other classes cover all of class c,
    inside the whole class mask instead.
    """
    own = masks[c]
    others = np.delete(masks, c, axis=0).any(axis=0) if masks.shape[0] > 1 else np.zeros_like(own)
    exclusive = own & ~others
    return interior_point(exclusive if exclusive.any() else own)


def extract_prompts(masks: np.ndarray) -> RefinementPrompts:
    """Prompts for all classes of one image from cleaned bool masks (C, H, W).

    Every present class gets its box, its positive point first and the other present classes'
    positive points as negatives, so all present classes carry the same number of points.
    """
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 3:
        raise ValueError(f"extract_prompts: expected masks of shape (C, H, W), got {masks.shape}")
    C = masks.shape[0]
    valid = masks.reshape(C, -1).any(axis=1)
    boxes = np.zeros((C, 4), dtype=np.float32)
    pos = np.zeros((C, 2), dtype=np.float32)
    for c in np.flatnonzero(valid):
        boxes[c] = mask_box(masks[c])
        pos[c] = positive_point(masks, int(c))
    present = np.flatnonzero(valid)
    P = max(len(present), 1)
    points = np.zeros((C, P, 2), dtype=np.float32)
    labels = np.full((C, P), -1, dtype=np.int32)
    for c in present:
        order = [c] + [o for o in present if o != c]
        points[c, : len(order)] = pos[order]
        labels[c, 0] = 1
        labels[c, 1 : len(order)] = 0
    return RefinementPrompts(boxes=boxes, points=points, point_labels=labels, valid=valid)
