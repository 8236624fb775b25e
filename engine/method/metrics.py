"""Dice scores of binary masks and their summaries / plain-text tables."""
from __future__ import annotations

import numpy as np

from plabel.method.cleaning import CleaningConfig, clean_masks


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
    ``probs > threshold``, or with ``clean`` the cleaned masks (plabel.method.cleaning.clean_masks
    at that threshold). Returns float64 (N, C) of :func:`dice_per_class` ((0, 0) for no images).
    """
    if len(probs) != len(truths):
        raise ValueError(f"dice_of_probs: {len(probs)} probability maps but {len(truths)} truths")
    out = []
    for p, t in zip(probs, truths):
        if clean:
            pred = clean_masks(np.asarray(p), CleaningConfig(threshold=threshold))
        else:
            pred = np.asarray(p) > threshold
        out.append(dice_per_class(pred, t))
    return np.asarray(out, dtype=np.float64).reshape(len(out), -1 if out else 0)


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


def format_dice_table(rows: dict[str, dict], classes: list[str]) -> str:
    """Plain-text table: one row per model, a column per class, then "mean ± std".

    rows: {model name: summarize_dice(...) dict}. Values are shown x100 with 2 decimals.
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
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (cell.rjust(wd) for cell, wd in zip(cells[1:], widths[1:]))
        return "  ".join([first, *rest]).rstrip()

    rule = "  ".join("-" * wd for wd in widths)
    return "\n".join([line(header), rule, *(line(r) for r in body)])
