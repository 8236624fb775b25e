"""One table part at a time: its exportable rows, their images from the shards, the files written.

Ray-free; ``plabel.jobs.export_job`` runs :func:`export_part` as one task per Parquet part (a label
or predict job writes one part per input shard, so a task reads one shard).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Iterator

import pyarrow.parquet as pq

from plabel.data import storage
from plabel.data.export import coco, dicom_seg, nnunet, png
from plabel.data.export.select import ExportRow, Selection, export_row
from plabel.data.shard_reader import read_shard_file
from plabel.data.shards import image_member
from plabel.errors import InputError

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
    reason)`` for a row whose sample is missing or unusable. A shard that cannot be opened raises
    InputError naming it (the table points at shards that moved or were deleted)."""
    by_shard: dict[str, dict[str, ExportRow]] = defaultdict(dict)
    for er in rows:
        by_shard[er.shard][er.key] = er
    for shard, wanted in by_shard.items():
        local = not storage.is_uri(shard)
        fs, path = (None, shard) if local else storage.resolve(shard)
        try:
            samples = read_shard_file(path, shard, fs)
            for sample in samples:
                er = wanted.pop(str(sample["__key__"]), None)
                if er is None:
                    continue
                if sample.get("__error__") is not None:
                    yield er, None, f"unusable sample in {shard}: {sample['__error__']}"
                    continue
                ext, data = image_member(sample)
                yield er, ext, data
        except FileNotFoundError:
            raise InputError(f"{storage.redact(shard)}: the shard that holds this table's images is missing "
                             "(exports read the images from the shards the table names)") from None
        for er in wanted.values():
            yield er, None, f"sample {er.key} not found in {storage.redact(shard)}"


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
