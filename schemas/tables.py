"""Versioned Arrow schemas of the tables plabel writes.

The pseudo-label table has one row per input image. Image-level columns come first (id, shard,
key, height, width, sop_instance_uid, status, message, provenance); then, for
every class ``<c>`` (in the order of the schema metadata ``plabel.classes``), the columns
``<c>.mask``, ``<c>.box``, ``<c>.points``, ``<c>.point_labels``, ``<c>.area``, ``<c>.unet_prob``,
``<c>.sam_iou``, ``<c>.agreement_dice`` and ``<c>.kept``. It is readable with pyarrow or pandas
alone; :func:`decode_class_masks` turns a row back into numpy masks.

The prediction table (``plabel predict``) has the same image-level columns (without the SAM ones)
and, per class, ``<c>.mask``, ``<c>.area`` and ``<c>.unet_prob`` (mean probability inside the mask).
:func:`table_info` tells the two apart.
"""
from __future__ import annotations

import json
from typing import Mapping, Sequence

import numpy as np
import pyarrow as pa

from plabel.schemas.masks import decode_mask

# version 2 added the image-level column sop_instance_uid (DICOM sources); version 1 tables are
# still read (the column is then missing: :func:`image_uid` gives None)
PSEUDO_LABEL_SCHEMA_VERSION = "2"
PREDICTION_SCHEMA_VERSION = "2"
TABLE_KINDS = {"pseudo_labels": PSEUDO_LABEL_SCHEMA_VERSION, "predictions": PREDICTION_SCHEMA_VERSION}
READABLE_VERSIONS = ("1", "2")
STATUS_VALUES = ("ok", "empty", "error")
# sam: SAM's refined mask kept; unet: the cleaned U-Net mask kept; dropped: class ignored when
# training the student (quality gate said neither is trustworthy); empty: the teacher found no
# pixel of the class, stored as an empty mask and trained as background.
KEPT_VALUES = ("sam", "unet", "dropped", "empty")

IMAGE_FIELDS = [
    pa.field("id", pa.string(), nullable=False),
    pa.field("shard", pa.string()),
    pa.field("key", pa.string()),
    pa.field("height", pa.int32()),
    pa.field("width", pa.int32()),
    pa.field("sop_instance_uid", pa.string()),  # a DICOM source's SOPInstanceUID (null for other images)
    pa.field("status", pa.string(), nullable=False),
    pa.field("message", pa.string()),
    pa.field("unet_checkpoint_sha256", pa.string()),
    pa.field("sam_backend", pa.string()),
    pa.field("sam_checkpoint_sha256", pa.string()),
]

CLASS_FIELD_TYPES = {
    "mask": pa.binary(),  # encode_mask bits of the kept mask (height x width)
    "box": pa.list_(pa.float32(), 4),  # x0, y0, x1, y1 of the cleaned U-Net mask (SAM's box prompt)
    "points": pa.list_(pa.list_(pa.float32(), 2)),  # positive point first, then negatives
    "point_labels": pa.list_(pa.int8()),  # 1 positive, 0 negative
    "area": pa.int64(),  # pixels in the kept mask
    "unet_prob": pa.float32(),  # U-Net mean probability inside the cleaned mask
    "sam_iou": pa.float32(),  # SAM's predicted IoU (final stage)
    "agreement_dice": pa.float32(),  # Dice between cleaned U-Net mask and SAM mask
    "kept": pa.string(),  # one of KEPT_VALUES
}


def class_column(cls: str, field: str) -> str:
    """Column name of a per-class field, e.g. ``heart.sam_iou``."""
    return f"{cls}.{field}"


def pseudo_label_schema(classes: Sequence[str], extra_metadata: Mapping[str, str] | None = None) -> pa.Schema:
    """Arrow schema of the pseudo-label table for the given class order."""
    classes = list(classes)
    if not classes or len(set(classes)) != len(classes):
        raise ValueError(f"pseudo_label_schema: class names must be non-empty and unique, got {classes}")
    for c in classes:
        if not c or "." in c:
            raise ValueError(f"pseudo_label_schema: class name {c!r} must be non-empty and contain no '.'")
    fields = list(IMAGE_FIELDS)
    for c in classes:
        fields += [pa.field(class_column(c, f), t) for f, t in CLASS_FIELD_TYPES.items()]
    metadata = {
        "plabel.table": "pseudo_labels",
        "plabel.schema_version": PSEUDO_LABEL_SCHEMA_VERSION,
        "plabel.classes": json.dumps(classes),
    }
    metadata.update(extra_metadata or {})
    return pa.schema(fields, metadata=metadata)


PREDICTION_IMAGE_FIELDS = [f for f in IMAGE_FIELDS if not f.name.startswith("sam_")]
PREDICTION_CLASS_FIELD_TYPES = {k: CLASS_FIELD_TYPES[k] for k in ("mask", "area", "unet_prob")}


def prediction_schema(classes: Sequence[str], extra_metadata: Mapping[str, str] | None = None) -> pa.Schema:
    """Arrow schema of the prediction table (``plabel predict``) for the given class order."""
    base = pseudo_label_schema(classes)  # the same checks of the class names
    fields = list(PREDICTION_IMAGE_FIELDS)
    for c in classes:
        fields += [pa.field(class_column(c, f), t) for f, t in PREDICTION_CLASS_FIELD_TYPES.items()]
    metadata = {k.decode(): v.decode() for k, v in base.metadata.items()}
    metadata.update({"plabel.table": "predictions", "plabel.schema_version": PREDICTION_SCHEMA_VERSION})
    metadata.update(extra_metadata or {})
    return pa.schema(fields, metadata=metadata)


def table_info(schema: pa.Schema) -> tuple[str, list[str]]:
    """``(kind, classes)`` of a plabel table: kind 'pseudo_labels' or 'predictions' (ValueError
    for any other table or an unsupported schema version)."""
    meta = schema.metadata or {}
    kind = meta.get(b"plabel.table", b"").decode()
    if kind not in TABLE_KINDS:
        raise ValueError("not a plabel pseudo-label or prediction table (schema metadata plabel.table missing)")
    version = meta.get(b"plabel.schema_version", b"").decode()
    if version not in READABLE_VERSIONS:
        raise ValueError(f"{kind} table schema version {version!r} is not supported (this plabel reads versions "
                         f"{', '.join(READABLE_VERSIONS)})")
    return kind, json.loads(meta[b"plabel.classes"].decode())


def image_uid(row: Mapping) -> str | None:
    """The row's DICOM SOPInstanceUID, None for non-DICOM images and version-1 rows (no column)."""
    uid = row.get("sop_instance_uid")
    return uid if isinstance(uid, str) and uid else None


def table_classes(schema: pa.Schema) -> list[str]:
    """Class order stored in a pseudo-label schema's metadata (ValueError if it is not one)."""
    kind, classes = table_info(schema)
    if kind != "pseudo_labels":
        raise ValueError("not a plabel pseudo-label table (schema metadata plabel.table missing)")
    return classes


def decode_class_masks(row: Mapping, classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Kept masks and training weights of one table row.

    Returns masks bool (C, H, W) and weight float32 (C,): 0 for classes the quality gate dropped
    (and for every class of a row whose status is error), 1 otherwise.
    """
    h, w = int(row["height"] or 0), int(row["width"] or 0)
    masks = np.zeros((len(classes), h, w), dtype=bool)
    weight = np.zeros(len(classes), dtype=np.float32)
    if row["status"] == "error":
        return masks, weight
    for i, c in enumerate(classes):
        kept = row[class_column(c, "kept")]
        if kept == "dropped":
            continue
        weight[i] = 1.0
        data = row[class_column(c, "mask")]
        if data is not None:
            masks[i] = decode_mask(data, h, w)
    return masks, weight
