"""Dice and HD95 scores of binary masks and their summaries / plain-text tables."""
from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from plabel.method.prediction import predicted_masks


def dice(pred: np.ndarray, truth: np.ndarray, empty_value: float = 1.0) -> float:
    """Dice 2|P & T| / (|P| + |T|) of two boolean arrays of the same shape.

    Both empty -> ``empty_value``; exactly one empty -> 0.0.
    """
    pred = np.asarray(pred, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    if pred.shape != truth.shape:
        raise ValueError(f"dice: pred shape {pred.shape} != truth shape {truth.shape}")
    total = int(pred.sum()) + int(truth.sum())
    if total == 0:
        return float(empty_value)
    return 2.0 * int(np.logical_and(pred, truth).sum()) / total


def dice_per_class(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Dice of each class. pred, truth: bool (C, H, W). Returns float64 (C,).

    A class absent from both pred and truth scores 1.0.
    """
    pred = np.asarray(pred, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    if pred.shape != truth.shape or pred.ndim != 3:
        raise ValueError(f"dice_per_class expects two (C, H, W) arrays, got pred {pred.shape} "
                         f"and truth {truth.shape}")
    inter = np.logical_and(pred, truth).sum(axis=(1, 2)).astype(np.float64)
    total = pred.sum(axis=(1, 2)).astype(np.float64) + truth.sum(axis=(1, 2))
    out = np.ones(pred.shape[0], dtype=np.float64)
    nz = total > 0
    out[nz] = 2.0 * inter[nz] / total[nz]
    return out


def dice_of_probs(probs, truths, threshold: float = 0.5, clean: bool = False) -> np.ndarray:
    """Per-image, per-class Dice of a model's predictions, as ``plabel evaluate`` scores them.

    probs: per image float (C, H, W) sigmoid probabilities on the image's own grid
    (plabel.method.labelling.teacher_probs); truths: per image bool (C, H, W). The prediction is
    ``probs > threshold``, or with ``clean`` the cleaned masks at that threshold
    (plabel.method.prediction.predicted_masks, as ``plabel predict`` writes them). Returns float64 (N, C) of :func:`dice_per_class` ((0, 0) for no images).
    """
    if len(probs) != len(truths):
        raise ValueError(f"dice_of_probs: {len(probs)} probability maps but {len(truths)} truths")
    out = [dice_per_class(predicted_masks(p, threshold, clean), t) for p, t in zip(probs, truths)]
    return np.asarray(out, dtype=np.float64).reshape(len(out), -1 if out else 0)


def _surface(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of a bool (H, W) mask, as MONAI's get_mask_edges: the mask XOR its binary
    erosion (4-connected cross; outside the array is background, so mask pixels on the border count)."""
    return mask ^ ndimage.binary_erosion(mask)


def _sampling(spacing) -> tuple[float, float] | None:
    """(row, col) pixel spacing as two positive floats, or None for pixels."""
    if spacing is None:
        return None
    s = np.asarray(spacing, dtype=np.float64).reshape(-1)
    if s.shape != (2,) or not np.all(np.isfinite(s) & (s > 0)):
        raise ValueError(f"spacing must be (row, col), two positive numbers, or None; got {spacing!r}")
    return float(s[0]), float(s[1])


def hd95(pred: np.ndarray, truth: np.ndarray, spacing=None) -> float:
    """95th-percentile Hausdorff distance of two bool (H, W) masks, as MONAI's
    ``compute_hausdorff_distance(..., percentile=95)`` with its defaults (euclidean, not directed).

    Surfaces are the boundary pixels (mask XOR its 4-connected erosion). The distances from each
    pred-surface pixel to the nearest truth-surface pixel (pixel centres; the nearest *surface*
    pixel, so a pred pixel inside truth is not at 0), and from truth to pred, each give a 95th
    percentile (linear interpolation, as np.percentile / torch.quantile); the result is the larger.
    spacing: (row, col) pixel size, e.g. in mm, or None for pixels. Returns a float (float64; MONAI
    computes in float32). Both masks empty -> 0.0 (MONAI gives nan); exactly one empty -> nan (as MONAI).
    """
    pred = np.asarray(pred, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    if pred.shape != truth.shape or pred.ndim != 2:
        raise ValueError(f"hd95 expects two (H, W) arrays, got pred {pred.shape} and truth {truth.shape}")
    sampling = _sampling(spacing)
    has_pred, has_truth = bool(pred.any()), bool(truth.any())
    if not (has_pred or has_truth):
        return 0.0
    if not (has_pred and has_truth):
        return float("nan")
    # crop to the union's bounding box: everything outside is background in both masks, so the
    # surfaces and the nearest-surface distances are unchanged
    union = pred | truth
    rows = np.flatnonzero(union.any(axis=1))
    cols = np.flatnonzero(union.any(axis=0))
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    sp, st = _surface(pred[box]), _surface(truth[box])
    if 8 * (int(sp.sum()) + int(st.sum())) < sp.size:
        # sparse surfaces (blobs): a KD-tree over the surface pixels costs O(perimeter), ~10x faster than
        # the O(area) distance transforms on 1024x1024 blobs (MONAI's CPU path does the same)
        scale = np.ones(2) if sampling is None else np.asarray(sampling)
        pc, tc = np.argwhere(sp) * scale, np.argwhere(st) * scale
        pred_to_truth = cKDTree(tc, leafsize=32).query(pc, k=1)[0]
        truth_to_pred = cKDTree(pc, leafsize=32).query(tc, k=1)[0]
    else:  # dense surfaces (noisy masks): the distance transform is faster
        pred_to_truth = ndimage.distance_transform_edt(~st, sampling=sampling)[sp]
        truth_to_pred = ndimage.distance_transform_edt(~sp, sampling=sampling)[st]
    return float(max(np.percentile(pred_to_truth, 95), np.percentile(truth_to_pred, 95)))


def hd95_per_class(pred: np.ndarray, truth: np.ndarray, spacing=None) -> np.ndarray:
    """:func:`hd95` of each class. pred, truth: bool (C, H, W). Returns float64 (C,).

    A class absent from both scores 0.0; absent from exactly one, nan.
    """
    pred = np.asarray(pred, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    if pred.shape != truth.shape or pred.ndim != 3:
        raise ValueError(f"hd95_per_class expects two (C, H, W) arrays, got pred {pred.shape} "
                         f"and truth {truth.shape}")
    return np.array([hd95(p, t, spacing) for p, t in zip(pred, truth)], dtype=np.float64).reshape(-1)


def summarize_dice(per_image: np.ndarray, classes: list[str]) -> dict:
    """Summary of a Dice matrix. per_image: float (N, C), row = image, column = class.

    Returns {"mean_dice": mean over images of the per-image class mean,
             "std_dice": population std (ddof=0) over images of that per-image mean,
             "per_class": {class: mean over images}, "per_class_std": {class: std, ddof=0},
             "n_images": N}. Plain Python floats / ints; all NaN when N == 0.
    """
    a = np.asarray(per_image, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] != len(classes):
        raise ValueError(f"summarize_dice expects per_image (N, {len(classes)}) for classes "
                         f"{list(classes)}, got shape {a.shape}")
    n = a.shape[0]
    if n == 0:
        nan = float("nan")
        return {"mean_dice": nan, "std_dice": nan, "per_class": {c: nan for c in classes},
                "per_class_std": {c: nan for c in classes}, "n_images": 0}
    image_mean = a.mean(axis=1)
    return {
        "mean_dice": float(image_mean.mean()),
        "std_dice": float(image_mean.std()),
        "per_class": {c: float(v) for c, v in zip(classes, a.mean(axis=0))},
        "per_class_std": {c: float(v) for c, v in zip(classes, a.std(axis=0))},
        "n_images": int(n),
    }


def summarize_hd95(per_image: np.ndarray, classes: list[str]) -> dict:
    """Summary of an HD95 matrix. per_image: float (N, C), row = image, column = class, nan where
    the class is in only one of pred / truth (:func:`hd95_per_class`); nan entries are left out.

    Returns {"mean_hd95": mean over images of the per-image mean over its non-nan classes (images
             with every class nan left out), "std_hd95": its population std (ddof=0),
             "per_class": {class: mean over non-nan images}, "per_class_std": {class: std, ddof=0},
             "n_nan": {class: number of nan images}, "n_images": N}.
    Plain Python floats / ints; a mean or std with no values is nan.
    """
    a = np.asarray(per_image, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] != len(classes):
        raise ValueError(f"summarize_hd95 expects per_image (N, {len(classes)}) for classes "
                         f"{list(classes)}, got shape {a.shape}")

    def mean_std(v: np.ndarray) -> tuple[float, float]:
        v = v[~np.isnan(v)]
        return (float(v.mean()), float(v.std())) if v.size else (float("nan"), float("nan"))

    ok = ~np.isnan(a)
    n_ok = ok.sum(axis=1)
    image_mean = np.where(ok, a, 0.0).sum(axis=1) / np.maximum(n_ok, 1)
    mean, std = mean_std(np.where(n_ok > 0, image_mean, np.nan))
    per_class = [mean_std(a[:, j]) for j in range(a.shape[1])]
    return {
        "mean_hd95": mean,
        "std_hd95": std,
        "per_class": {c: m for c, (m, _) in zip(classes, per_class)},
        "per_class_std": {c: sd for c, (_, sd) in zip(classes, per_class)},
        "n_nan": {c: int(k) for c, k in zip(classes, (~ok).sum(axis=0))},
        "n_images": int(a.shape[0]),
    }


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    """Lines of a plain-text table: first column left-aligned, the rest right-aligned, a rule under the header."""
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (cell.rjust(wd) for cell, wd in zip(cells[1:], widths[1:]))
        return "  ".join([first, *rest]).rstrip()

    rule = "  ".join("-" * wd for wd in widths)
    return [line(header), rule, *(line(r) for r in body)]


def format_dice_table(rows: dict[str, dict], classes: list[str], hd95: dict[str, dict] | None = None,
                      hd95_unit: str = "px") -> str:
    """Plain-text table: one row per model, a column per class, then "mean ± std".

    rows: {model name: summarize_dice(...) dict}. Values are shown x100 with 2 decimals.
    hd95: optional {model name: summarize_hd95(...) dict}; adds, after a blank line, an
    "HD95 (<hd95_unit>)" section in the same layout, values with 2 decimals and a class's nan
    image count as " (k nan)" where k > 0.
    """
    def pct(v: float) -> str:
        return f"{100.0 * v:.2f}"

    header = ["model", *classes, "mean ± std", "n"]
    body = []
    for name, s in rows.items():
        missing = [c for c in classes if c not in s["per_class"]]
        if missing:
            raise ValueError(f"row {name!r} lacks classes {missing}")
        body.append([str(name), *(pct(s["per_class"][c]) for c in classes),
                     f"{pct(s['mean_dice'])} ± {pct(s['std_dice'])}", str(s["n_images"])])
    lines = _table(header, body)
    if hd95 is not None:
        def num(v) -> str:  # None: a summary read back from JSON, where nan is stored as null
            return "nan" if v is None else f"{v:.2f}"

        def cell(s: dict, c: str) -> str:
            k = s["n_nan"][c]
            return num(s["per_class"][c]) + (f" ({k} nan)" if k else "")

        hd_body = []
        for name, s in hd95.items():
            missing = [c for c in classes if c not in s["per_class"]]
            if missing:
                raise ValueError(f"HD95 row {name!r} lacks classes {missing}")
            hd_body.append([str(name), *(cell(s, c) for c in classes),
                            f"{num(s['mean_hd95'])} ± {num(s['std_hd95'])}", str(s["n_images"])])
        lines += ["", f"HD95 ({hd95_unit})", *_table(header, hd_body)]
    return "\n".join(lines)
