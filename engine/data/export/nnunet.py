"""``--format nnunet``: an nnU-Net v2 raw dataset with region-based labels.

    OUT/imagesTr/<case>_0000.png    gray uint8, the image as plabel's U-Net saw it
    OUT/labelsTr/<case>.png         label map (uint8, uint16 beyond 255 values)
    OUT/dataset.json                written last

plabel's classes overlap (a clavicle lies over a lung); an nnU-Net label map holds one value per
pixel. Every COMBINATION of classes that occurs on some pixel gets its own label value (1..K, in
order of the combination's bit code, bit i = i-th exported class), and each class is an nnU-Net
region: the list of the values whose combination contains it. So no overlap is lost, and nnU-Net
trains one sigmoid per class, as plabel does. Where no two classes ever overlap, every class is one
plain label instead.

A class that is not known on an image (the gate dropped it, or the selection left it out) may lie
anywhere inside the box the teacher found for it: the pixels of that box, grown by a tenth of its
size (at least 2 pixels) on every side, get nnU-Net's ``ignore`` label (K + 1, the highest value,
as nnU-Net requires), so nnU-Net learns neither the class nor background there; without a box the
whole image is ignored. Classes that never occur in the export are left out of dataset.json (and
named in the summary): an nnU-Net region cannot be empty.
"""
from __future__ import annotations

import json

import numpy as np

from plabel.data import storage
from plabel.data.export.images import gray_png, png_bytes
from plabel.data.export.select import ExportRow

NAME = "nnunet"
MAX_CLASSES = 62  # combination codes are int64 bit sets


def codes(er: ExportRow) -> np.ndarray:
    """int64 (H, W): bit i set where the i-th exported class's known mask is."""
    out = np.zeros((er.height, er.width), np.int64)
    for i, lab in enumerate(er.labels.values()):
        if lab.state != "unknown":
            out |= lab.mask.astype(np.int64) << i
    return out


def ignore_mask(er: ExportRow) -> np.ndarray:
    """bool (H, W): the pixels an unknown class may cover (its grown box; all pixels without one)."""
    out = np.zeros((er.height, er.width), bool)
    for lab in er.labels.values():
        if lab.state != "unknown":
            continue
        if lab.box is None:
            out[:] = True
            continue
        x0, y0, x1, y1 = lab.box
        mx, my = max(2.0, 0.1 * (x1 - x0 + 1)), max(2.0, 0.1 * (y1 - y0 + 1))
        r0, r1 = int(max(0, np.floor(y0 - my))), int(min(er.height, np.ceil(y1 + my) + 1))
        c0, c1 = int(max(0, np.floor(x0 - mx))), int(min(er.width, np.ceil(x1 + mx) + 1))
        out[r0:r1, c0:c1] = True
    return out


def scan_row(er: ExportRow) -> dict:
    """Pass 1: the combination codes present on the image and whether it needs the ignore label."""
    present = np.unique(codes(er))
    return {"codes": [int(c) for c in present if c], "unknown": bool(ignore_mask(er).any())}


def plan(scans: list[dict], classes: list[str]) -> dict:
    """Label values from pass 1: ``{"values": {code: value}, "ignore": int | None, "labels": {...},
    "regions_class_order": [...] | None, "absent": [classes that never occur]}``."""
    if len(classes) > MAX_CLASSES:
        raise ValueError(f"--format nnunet: at most {MAX_CLASSES} classes, got {len(classes)}")
    all_codes = sorted({c for s in scans for c in s["codes"]})
    values = {code: i + 1 for i, code in enumerate(all_codes)}
    ignore = len(values) + 1 if any(s["unknown"] for s in scans) else None
    labels: dict = {"background": 0}
    order, absent = [], []
    for i, c in enumerate(classes):
        vals = [v for code, v in values.items() if code >> i & 1]
        if not vals:
            absent.append(c)
            continue
        labels[c] = vals if len(vals) > 1 else vals[0]
        order.append(values.get(1 << i, vals[0]))  # at inference a region paints its own label's value
    regions = any(isinstance(v, list) for v in labels.values())
    if ignore is not None:
        labels["ignore"] = ignore
    if len(values) + (ignore is not None) > 65535:
        raise ValueError(f"--format nnunet: {len(values)} class combinations do not fit a 16-bit label map")
    return {"values": {str(k): v for k, v in values.items()}, "ignore": ignore, "labels": labels,
            "regions_class_order": order if regions else None, "absent": absent}


def label_map(er: ExportRow, p: dict) -> np.ndarray:
    """uint8 / uint16 (H, W): each pixel's combination value, ``ignore`` where a class is unknown."""
    top = len(p["values"]) + 1
    lut_codes = np.array([0] + [int(k) for k in p["values"]], np.int64)
    lut_vals = np.array([0] + list(p["values"].values()), np.int64)
    c = codes(er)
    order = np.argsort(lut_codes)
    idx = np.searchsorted(lut_codes[order], c)
    idx = np.clip(idx, 0, len(order) - 1)
    if not np.array_equal(lut_codes[order][idx], c):
        raise ValueError(f"{er.id}: a class combination missing from the plan (the table changed between passes?)")
    out = lut_vals[order][idx]
    if p["ignore"] is not None:
        out[ignore_mask(er)] = p["ignore"]
    return out.astype(np.uint8 if top <= 255 else np.uint16)


def write_row(er: ExportRow, ext: str, data: bytes, out: str, plan: dict) -> dict:
    """Write imagesTr/<case>_0000.png and labelsTr/<case>.png (case = the sample key)."""
    lab = label_map(er, plan)
    storage.write_bytes(storage.join(out, "imagesTr", f"{er.key}_0000.png"), gray_png(ext, data, er.id))
    storage.write_bytes(storage.join(out, "labelsTr", f"{er.key}.png"), png_bytes(lab))
    return {"id": er.id, "case": er.key, "images": 1,
            "masks": sum(1 for lab_ in er.labels.values() if lab_.state != "unknown"),
            "ignored_pixels": int((lab == plan["ignore"]).sum()) if plan["ignore"] is not None else 0}


def finish(out: str, records: list[dict], classes: list[str], plan: dict, meta: dict) -> dict:
    """Write dataset.json (nnU-Net's keys, plus plabel's combination table under ``plabel``)."""
    n = sum(1 for r in records if "case" in r)
    combos = {str(v): [c for i, c in enumerate(classes) if int(code) >> i & 1] for code, v in plan["values"].items()}
    doc = {"channel_names": {"0": "X-ray"}, "labels": plan["labels"], "numTraining": n, "file_ending": ".png",
           "name": meta.get("name", "plabel"), "description": f"plabel export of {meta['table']}",
           "plabel": {"classes": classes, "combinations": combos, "absent_classes": plan["absent"],
                      "version": meta["version"]}}
    if plan["regions_class_order"] is not None:
        doc["regions_class_order"] = plan["regions_class_order"]
    storage.write_text(storage.join(out, "dataset.json"), json.dumps(doc, indent=1) + "\n")
    return {"index": "dataset.json", "absent_classes": plan["absent"], "label_values": len(plan["values"]),
            "ignore_label": plan["ignore"]}
