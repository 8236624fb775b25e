"""`plabel export` as a Ray Data job: one task per Parquet part of the table (one input shard each).

    parts of the table (the completion marker's list)
      -> [nnunet only] scan_part    label values need every class combination that occurs: a first
                                    pass over the masks (no images) returns them to the driver
      -> export_part                per row: the image from its shard, the format's files
      -> driver                     the format's index file (classes.json / annotations.json /
                                    dataset.json) LAST, then plabel_export.json (counts, skipped ids)

What a format writes is in plabel.data.export (Ray-free). OUT must be missing or empty, so an export
never mixes with other files; an export is finished when its index file exists.
"""
from __future__ import annotations

import json
import time
from collections import Counter
from typing import Callable

import pyarrow.parquet as pq
import ray

import plabel

from plabel.data import storage
from plabel.data.export.parts import WRITERS, export_part, scan_part
from plabel.data.export.select import Selection
from plabel.data.table_commit import table_files
from plabel.errors import InputError
from plabel.jobs.cluster import quiet_ray_data
from plabel.schemas.tables import table_info


def open_table(table: str) -> tuple:
    """``(filesystem, files, kind, classes, rows)`` of a finished plabel table (a pseudo-label or
    prediction table folder, or a run directory holding pseudo_labels/); InputError naming it."""
    table = str(table)
    if storage.exists(storage.join(table, "results.json")) and storage.exists(storage.join(table, "pseudo_labels")):
        table = storage.join(table, "pseudo_labels")
    try:
        fs, files = table_files(table)
    except FileNotFoundError:
        raise InputError(f"{storage.redact(table)}: no plabel table there (a pseudo_labels/ or predictions/ "
                         "folder, or a run directory)") from None
    if not files:
        raise InputError(f"{storage.redact(table)}: the table has no Parquet files")
    try:
        kind, classes = table_info(pq.read_schema(files[0], filesystem=fs))
    except ValueError as e:
        raise InputError(f"{storage.redact(files[0])}: {e}") from None
    rows = sum(pq.read_metadata(f, filesystem=fs).num_rows for f in files)
    return fs, files, kind, classes, rows


def check_out(out: str) -> None:
    """An export's output must be missing or an empty folder (InputError naming it otherwise)."""
    if storage.is_remote(out):
        entries = storage.list_files(out)
    else:
        entries = storage.list_dir(out) if storage.is_dir(out) else []
        if not entries and storage.exists(out) and not storage.is_dir(out):
            raise InputError(f"{storage.redact(out)}: is a file; export writes a folder")
    if entries:
        raise InputError(f"{storage.redact(out)}: not empty; export into a new or empty folder")


def _export_batch(batch: dict, **kw) -> dict:
    records = []
    for f in batch["file"]:
        records += export_part(str(f), **kw)
    return {"record": [json.dumps(r) for r in records]}


def _scan_batch(batch: dict, **kw) -> dict:
    scans = []
    for f in batch["file"]:
        scans += scan_part(str(f), **kw)
    return {"scan": [json.dumps(s) for s in scans]}


def run_export(table: str, out: str, fmt: str, selection: Selection | None = None,
               progress: Callable[[int, int], None] | None = None) -> dict:
    """Export a plabel table into ``out`` (local folder or URI) in format ``fmt`` (png, nnunet, coco).

    Returns the summary also written to ``out/plabel_export.json``: rows, images and masks written,
    ``skipped`` (reason -> count; the ids are in the file), the format's index and notes, wall time.
    ``progress(rows_done, rows_total)`` is called on the driver as parts finish."""
    if fmt not in WRITERS:
        raise InputError(f"--format {fmt}: expected one of {', '.join(WRITERS)}")
    sel = selection or Selection()
    t0 = time.time()
    fs, files, kind, all_classes, total = open_table(table)
    try:
        classes = list(sel.check(all_classes, storage.redact(str(table))))
    except ValueError as e:
        raise InputError(str(e)) from None
    check_out(out)
    quiet_ray_data()
    out = str(out) if storage.is_remote(out) else str(storage.local_path(out))
    storage.makedirs(out)
    items = [{"file": f} for f in files]
    common = dict(fs=fs, kind=kind, classes=classes, sel=sel)

    def dataset():
        return ray.data.from_items(items, override_num_blocks=len(items))

    plan: dict = {"version": plabel.__version__}
    if fmt == "nnunet":
        scans = [json.loads(r["scan"]) for r in dataset().map_batches(_scan_batch, fn_kwargs=common,
                                                                        batch_size=1, num_cpus=1).take_all()]
        plan = WRITERS[fmt].plan(scans, classes)
    records: list[dict] = []
    if progress is not None:
        progress(0, total)
    ds = dataset().map_batches(_export_batch, fn_kwargs=dict(fmt=fmt, out=out, plan=plan, **common),
                               batch_size=1, num_cpus=1)
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        got = [json.loads(r) for r in batch.column("record").to_pylist()]
        records += got
        if progress is not None:
            progress(len(got), total)
    meta = {"table": storage.redact(str(table)), "kind": kind, "version": plabel.__version__, "name": "plabel"}
    index = WRITERS[fmt].finish(out, records, classes, plan, meta)
    skipped = [r for r in records if "skipped" in r]
    summary = {
        "format": fmt, "table": meta["table"], "table_kind": kind, "out": storage.redact(out), "classes": classes,
        "rows": total, "images": sum(r.get("images", 0) for r in records),
        "masks": sum(r.get("masks", 0) for r in records),
        "skipped": dict(Counter(_reason(r["skipped"]) for r in skipped)),
        "selection": {"status": list(sel.status), "kept": list(sel.kept), "min_score": sel.min_score},
        **index, "wall_s": round(time.time() - t0, 2),
    }
    detail = {**summary, "skipped_ids": {r["id"]: r["skipped"] for r in skipped}}
    storage.write_text(storage.join(out, "plabel_export.json"), json.dumps(detail, indent=1) + "\n")
    return summary


# how a per-row skip reason starts -> the reason as the summary counts it
_REASONS = {"sample ": "sample not found in its shard", "unusable sample": "unusable sample in its shard",
            "id ": "id cannot be a file name",
            "the shard's source is SOPInstanceUID": "the shard's DICOM source is not the labelled one"}


def _reason(text: str) -> str:
    """A skip reason without the per-row detail (grouped in the summary)."""
    return next((reason for head, reason in _REASONS.items() if text.startswith(head)), text)
