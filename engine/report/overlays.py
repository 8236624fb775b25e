"""Images with masks drawn on them, for the report (numpy + cv2; RGB uint8 throughout).

    class_colours  one RGB colour per class (a fixed palette, so a class keeps its colour everywhere)
    scale_to       gray (H, W) uint8 and bool masks (C, H, W) resized so the long side is ``side``
    overlay        gray (H, W) uint8 + masks bool (C, H, W) -> RGB (H, W, 3): filled (alpha) and/or outlined
    draw_prompts   SAM's prompts on an RGB image: boxes (x0, y0, x1, y1) and points (x, y), positive
                   points as filled discs, negative ones as crosses
    strip          panels (H, W_i, 3) side by side with a thin white gap
    png            RGB (H, W, 3) uint8 -> PNG bytes
"""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

#: Okabe-Ito and tab10 colours, RGB; class i takes PALETTE[i % len]
PALETTE = ((230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178), (213, 94, 0),
           (204, 121, 167), (148, 103, 189), (140, 86, 75), (188, 189, 34))


def class_colours(n: int) -> list[tuple[int, int, int]]:
    """RGB colour of each of ``n`` classes."""
    return [PALETTE[i % len(PALETTE)] for i in range(n)]


def hex_colour(rgb: Sequence[int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def scale_to(gray: np.ndarray, masks: np.ndarray | None, side: int) -> tuple[np.ndarray, np.ndarray | None, float]:
    """Resize so the long side is ``side`` px: the image bilinear (area when shrinking), masks nearest.
    Returns (gray (h, w) uint8, masks bool (C, h, w) or None, factor new/old)."""
    h, w = gray.shape
    f = side / max(h, w)
    size = (max(1, round(w * f)), max(1, round(h * f)))
    interp = cv2.INTER_AREA if f < 1 else cv2.INTER_LINEAR
    g = cv2.resize(gray, size, interpolation=interp)
    m = None
    if masks is not None:
        m = np.stack([cv2.resize(x.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) > 0 for x in masks]) \
            if len(masks) else np.zeros((0, size[1], size[0]), bool)
    return g, m, f


def overlay(gray: np.ndarray, masks: np.ndarray, colours: Sequence[Sequence[int]], alpha: float = 0.35,
            fill: bool = True, outline: int = 1) -> np.ndarray:
    """gray uint8 (H, W), masks bool (C, H, W) -> RGB uint8 (H, W, 3): each class filled with its
    colour at ``alpha`` (if ``fill``) and outlined ``outline`` px wide (0: no outline)."""
    out = np.repeat(gray[..., None], 3, axis=2).astype(np.float32)
    for m, col in zip(masks, colours):
        if not m.any():
            continue
        if fill:
            out[m] = (1 - alpha) * out[m] + alpha * np.asarray(col, np.float32)
    out = np.clip(out, 0, 255).astype(np.uint8)
    if outline:
        for m, col in zip(masks, colours):
            if m.any():
                contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
                cv2.drawContours(out, contours, -1, tuple(int(v) for v in col), outline)
    return out


def draw_prompts(rgb: np.ndarray, boxes: Sequence, points: Sequence, point_labels: Sequence,
                 colours: Sequence[Sequence[int]], factor: float = 1.0) -> np.ndarray:
    """Draw per class its box (x0, y0, x1, y1) as a thin rectangle and its points (x, y): label 1
    a filled disc with a black rim, label 0 a cross (a few pixels, whatever the scale). Coordinates
    are in the original image's pixels and scaled by ``factor``; None entries (no prompt for that
    class) are skipped."""
    out = rgb.copy()
    r = 3 if max(rgb.shape[:2]) >= 160 else 2
    for box, pts, labels, col in zip(boxes, points, point_labels, colours):
        col = tuple(int(v) for v in col)
        if box is not None:
            x0, y0, x1, y1 = (round(float(v) * factor) for v in box)
            cv2.rectangle(out, (x0, y0), (x1, y1), col, 1, lineType=cv2.LINE_AA)
        for p, lab in zip(pts or [], labels or []):
            x, y = round(float(p[0]) * factor), round(float(p[1]) * factor)
            if lab:
                cv2.circle(out, (x, y), r + 1, (0, 0, 0), -1, lineType=cv2.LINE_AA)
                cv2.circle(out, (x, y), r, col, -1, lineType=cv2.LINE_AA)
            else:
                cv2.drawMarker(out, (x, y), col, cv2.MARKER_TILTED_CROSS, 2 * r + 2, 1)
    return out


def strip(panels: Sequence[np.ndarray], gap: int = 4) -> np.ndarray:
    """RGB panels of one height side by side, ``gap`` white columns between them -> RGB (H, W, 3)."""
    h = max(p.shape[0] for p in panels)
    cols = []
    for i, p in enumerate(panels):
        if p.shape[0] < h:
            p = np.pad(p, ((0, h - p.shape[0]), (0, 0), (0, 0)), constant_values=255)
        cols.append(p)
        if i < len(panels) - 1:
            cols.append(np.full((h, gap, 3), 255, np.uint8))
    return np.concatenate(cols, axis=1)


def png(rgb: np.ndarray) -> bytes:
    """RGB uint8 (H, W, 3) -> PNG bytes (zlib level 6: within 12 % of level 9's size, 7x faster)."""
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 6])
    if not ok:
        raise ValueError("overlays.png: cv2 could not encode the image")
    return buf.tobytes()
