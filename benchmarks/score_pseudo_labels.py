"""Score a pseudo-label table against ground truth: per class the gate's counts (sam / unet / dropped /
empty), the Dice of the kept masks, mean SAM IoU and mean U-Net / SAM agreement.

    .venv/bin/python benchmarks/score_pseudo_labels.py runs/jsrt-n10/pseudo_labels ../shared/data/jsrt256

DATA is a dataset folder in `plabel ingest`'s layout (masks/<class>/<id>.png, non-zero = inside);
the table is read through the public API (plabel.read_pseudo_labels). Prints JSON.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np

import plabel
from plabel.method.metrics import dice


def score(table: str, data: Path) -> dict:
    t = plabel.read_pseudo_labels(table)
    classes = plabel.table_classes(t)
    rows = t.to_pylist()
    out = {}
    for ci, c in enumerate(classes):
        kept = {"sam": 0, "unet": 0, "dropped": 0, "empty": 0}
        dices, iou, agreement = [], [], []
        for r in rows:
            if r["status"] == "error":
                continue
            kept[r[f"{c}.kept"]] += 1
            if r[f"{c}.sam_iou"] is not None:
                iou.append(r[f"{c}.sam_iou"])
            if r[f"{c}.agreement_dice"] is not None:
                agreement.append(r[f"{c}.agreement_dice"])
            if r[f"{c}.kept"] in ("sam", "unet"):
                masks, _ = plabel.pseudo_label_masks(r, classes)
                truth = cv2.imread(str(data / "masks" / c / f"{r['id']}.png"), cv2.IMREAD_GRAYSCALE)
                if truth is None:
                    raise FileNotFoundError(f"{data / 'masks' / c / (r['id'] + '.png')}: no ground truth for {r['id']}")
                dices.append(dice(masks[ci], truth > 0))
        out[c] = {"kept": kept, "dice_kept": float(np.mean(dices)) if dices else None,
                  "mean_sam_iou": float(np.mean(iou)) if iou else None,
                  "mean_agreement": float(np.mean(agreement)) if agreement else None}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("table", help="pseudo-label table folder (a path or s3:// / gs:// URI)")
    ap.add_argument("data", type=Path, help="dataset folder with masks/<class>/<id>.png")
    args = ap.parse_args(argv)
    print(json.dumps(score(args.table, args.data), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
