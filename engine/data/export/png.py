"""``--format png``: the source layout ``plabel ingest`` reads (a round trip gives the same masks).

    OUT/images/<id>.<ext>           the original image bytes (as stored in the shard)
    OUT/masks/<class>/<id>.png      8-bit, 255 inside (one file per exported class)
    OUT/classes.json                the exported classes in table order, written last

``plabel ingest`` needs a mask for EVERY class of an image, so an image is written only when every
exported class is known there; images with a class the gate dropped (or the selection left out)
are skipped and counted by class: export ``--classes`` without that class to keep them.
"""
from __future__ import annotations

import json

from plabel.data import storage
from plabel.data.export.images import mask_png
from plabel.data.export.select import ExportRow

NAME = "png"


def write_row(er: ExportRow, ext: str, data: bytes, out: str, plan: dict) -> dict:
    """Write one image and its masks; returns ``{"id", "images", "masks"}`` or ``{"id", "skipped"}``."""
    unknown = [c for c, lab in er.labels.items() if lab.state == "unknown"]
    if unknown:
        return {"id": er.id, "skipped": "class not known: " + ",".join(unknown)}
    storage.write_bytes(storage.join(out, "images", f"{er.id}.{ext}"), data)
    for c, lab in er.labels.items():
        storage.write_bytes(storage.join(out, "masks", c, f"{er.id}.png"), mask_png(lab.mask))
    return {"id": er.id, "images": 1, "masks": len(er.labels)}


def finish(out: str, records: list[dict], classes: list[str], plan: dict, meta: dict) -> dict:
    """Write classes.json (last: its presence marks a finished export)."""
    storage.write_text(storage.join(out, "classes.json"), json.dumps(classes, indent=1) + "\n")
    return {"index": "classes.json"}
