"""``--format coco``: COCO instance segmentation JSON with RLE masks (CVAT, Label Studio, detectron2).

    OUT/images/<file_name>          the image (original bytes; DICOM sources as gray PNG)
    OUT/annotations.json            images, categories (= classes, ids 1..C), annotations; written last

One annotation per image and class with a non-empty known mask: ``segmentation`` is COCO's
compressed RLE (pycocotools ``mask.encode``, counts as text), ``bbox`` [x, y, w, h] and ``area`` come
from pycocotools too, ``score`` is the class's quality score (SAM's IoU or the U-Net's probability,
plabel.data.export.select), ``iscrowd`` 0; ``plabel_kept`` says which mask the gate kept. Empty and
unknown classes have no annotation (COCO cannot say "not known": the per-image ``plabel_unknown``
list does). Image and annotation ids are 1-based, in order of the plabel ids.
"""
from __future__ import annotations

import json

import numpy as np
from pycocotools import mask as mask_utils

from plabel.data import storage
from plabel.data.export.images import gray_png
from plabel.data.export.select import ExportRow

NAME = "coco"
_KEEP_EXT = ("png", "jpg", "jpeg", "tif", "tiff")


def rle(mask: np.ndarray) -> dict:
    """bool (H, W) -> COCO compressed RLE ``{"size": [H, W], "counts": str}``."""
    encoded = mask_utils.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    return {"size": [int(v) for v in encoded["size"]], "counts": encoded["counts"].decode("ascii")}


def write_row(er: ExportRow, ext: str, data: bytes, out: str, plan: dict) -> dict:
    """Write the image; return the image entry and its annotations (ids are given in :func:`finish`)."""
    if ext in _KEEP_EXT:
        file_name = f"{er.id}.{ext}"
    else:
        file_name, data = f"{er.id}.png", gray_png(ext, data, er.id)
    storage.write_bytes(storage.join(out, "images", file_name), data)
    anns = []
    for c, lab in er.labels.items():
        if lab.state == "unknown" or not lab.mask.any():
            continue
        r = rle(lab.mask)
        anns.append({"category": c, "segmentation": r, "area": float(mask_utils.area(_bytes_rle(r))),
                     "bbox": [float(v) for v in mask_utils.toBbox(_bytes_rle(r))], "iscrowd": 0,
                     "score": lab.score, "plabel_kept": lab.decision})
    unknown = [c for c, lab in er.labels.items() if lab.state == "unknown"]
    image = {"file_name": file_name, "height": er.height, "width": er.width, "plabel_id": er.id,
             "plabel_unknown": unknown, **({"sop_instance_uid": er.sop_instance_uid} if er.sop_instance_uid else {})}
    return {"id": er.id, "images": 1, "masks": len(anns), "image": image, "annotations": anns}


def _bytes_rle(r: dict) -> dict:
    return {"size": r["size"], "counts": r["counts"].encode("ascii")}


def finish(out: str, records: list[dict], classes: list[str], plan: dict, meta: dict) -> dict:
    """Number images and annotations and write annotations.json."""
    cat = {c: i + 1 for i, c in enumerate(classes)}
    images, annotations = [], []
    for image_id, rec in enumerate(sorted((r for r in records if "image" in r), key=lambda r: r["id"]), start=1):
        images.append({"id": image_id, **rec["image"]})
        for a in rec["annotations"]:
            entry = {k: v for k, v in a.items() if k != "category"}
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cat[a["category"]],
                                **entry})
    doc = {"info": {"description": f"plabel export of {meta['table']}", "version": meta["version"],
                    "plabel_table": meta["kind"]},
           "licenses": [], "images": images,
           "categories": [{"id": i, "name": c, "supercategory": "anatomy"} for c, i in cat.items()],
           "annotations": annotations}
    storage.write_text(storage.join(out, "annotations.json"), json.dumps(doc) + "\n")
    return {"index": "annotations.json"}
