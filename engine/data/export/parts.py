"""One table part at a time: its exportable rows, their images from the shards, the files written.

Ray-free; ``plabel.jobs.export_job`` runs :func:`export_part` as one task per Parquet part (a label
or predict job writes one part per input shard, so a task reads one shard).
"""
from __future__ import annotations

from typing import Iterator

import pyarrow.parquet as pq

from plabel.data.export import coco, dicom_seg, nnunet, png
from plabel.data.export.select import ExportRow, Selection, export_row
from plabel.data.shards import image_member
from plabel.data.table_images import samples_of

WRITERS = {m.NAME: m for m in (png, nnunet, coco, dicom_seg)}


def read_part(file: str, fs, kind: str, classes: list[str], sel: Selection) -> tuple[list[ExportRow], list[dict]]:
    """The part's exportable rows and ``{"id", "skipped"}`` records for the rest (a reason each)."""
    rows, skipped = [], []
    for row in pq.read_table(file, filesystem=fs).to_pylist():
        er = export_row(row, kind, classes, sel)
        if isinstance(er, str):
            skipped.append({"id": str(row["id"]), "skipped": er})
        else:
            rows.append(er)
    return rows, skipped


def with_images(rows: list[ExportRow]) -> Iterator[tuple[ExportRow, str | None, bytes | str]]:
    """``(row, ext, image bytes)`` per row, reading each shard once in file order; ``(row, None,
    reason)`` for a row whose sample is missing or unusable (plabel.data.table_images.samples_of)."""
    for er, sample, reason in samples_of(rows, lambda r: r.shard, lambda r: r.key):
        if sample is None:
            yield er, None, reason
        else:
            yield (er, *image_member(sample))


def scan_part(file: str, fs, kind: str, classes: list[str], sel: Selection) -> list[dict]:
    """nnU-Net pass 1 over a part: per exportable row its combination codes (masks only, no images)."""
    rows, _ = read_part(file, fs, kind, classes, sel)
    return [nnunet.scan_row(er) for er in rows]


def export_part(file: str, fs, fmt: str, out: str, kind: str, classes: list[str], sel: Selection,
                plan: dict) -> list[dict]:
    """Write the part's rows in format ``fmt`` under ``out``; one record per row of the part
    (written: ``images`` / ``masks`` counts; not written: ``skipped`` with the reason)."""
    writer = WRITERS[fmt]
    rows, records = read_part(file, fs, kind, classes, sel)
    for er, ext, data in with_images(rows):
        if ext is None:
            records.append({"id": er.id, "skipped": data})
            continue
        records.append(writer.write_row(er, ext, data, out, plan))
    return records
