"""What a student trains on from one part of a pseudo-label table: its images and kept masks.

Ray-free; plabel.jobs.train_job runs :func:`pseudo_part_arrays` as one task per Parquet part. A
label job writes one part per unlabelled shard, so a part's images come from one shard, read
once (plabel.data.table_images), instead of a join of the whole table with every shard on id.
"""
from __future__ import annotations

import posixpath
from typing import Mapping, Sequence

import numpy as np
import pyarrow.parquet as pq

from plabel.data import storage
from plabel.data.samples import decode_gray
from plabel.data.table_images import samples_of
from plabel.errors import InputError
from plabel.method.labelling import pseudo_label_targets
from plabel.method.preprocess import to_unet_input
from plabel.schemas.tables import class_column


def shard_lookup(shards: Sequence[str]) -> dict[str, str]:
    """Where a table's ``shard`` value is read from: each given shard by its own name and by its
    file name (a run directory that moved still finds its shards). Two shards of one file name
    leave that name out: their rows must then name them exactly."""
    names: dict[str, list[str]] = {}
    for s in shards:
        names.setdefault(posixpath.basename(str(s).rstrip("/")), []).append(str(s))
    lookup = {name: paths[0] for name, paths in names.items() if len(paths) == 1}
    lookup.update({str(s): str(s) for s in shards})
    return lookup


def pseudo_part_arrays(part: str, fs, classes: Sequence[str], image_size: int, intensity: str,
                       shards: Mapping[str, str]) -> dict:
    """The trainable rows (status ok or empty) of one table part with their images.

    part: a Parquet file of a finished pseudo-label table (in pyarrow filesystem ``fs``, None:
    local). shards: :func:`shard_lookup` of the unlabelled shards the rows may come from.
    Returns id object (N,), image float32 (N, S, S) (plabel.method.preprocess.to_unet_input with ``intensity``),
    masks uint8 (N, C, S, S) and weight float32 (N, C) (plabel.method.labelling.pseudo_label_targets:
    weight 0 where the gate dropped the class), S = ``image_size``, rows in their shard's order.
    A row whose shard is not among ``shards`` or whose sample its shard lacks raises InputError
    naming the row: a pseudo label never leaves training silently."""
    where = storage.redact(str(part))
    cols = ["id", "shard", "key", "status", "height", "width"] + [class_column(c, f) for c in classes
                                                                   for f in ("mask", "kept")]
    rows = [r for r in pq.read_table(part, filesystem=fs, columns=cols).to_pylist() if r["status"] != "error"]
    for r in rows:
        name = str(r["shard"])
        r["_shard"] = shards.get(name) or shards.get(posixpath.basename(name.rstrip("/")))
        if r["_shard"] is None:
            raise InputError(f"{where}: pseudo-label row {r['id']} comes from shard {storage.redact(name)}, "
                             f"which is not among the {len(set(shards.values()))} unlabelled shards given")
    kept, images = [], []
    for r, sample, reason in samples_of(rows, lambda r: r["_shard"], lambda r: str(r["key"])):
        if sample is None:
            raise InputError(f"{where}: pseudo-label row {r['id']} has no image: {reason}")
        kept.append(r)
        images.append(to_unet_input(decode_gray(sample), image_size, intensity))
    masks, weight = pseudo_label_targets(kept, classes, image_size)
    S = image_size
    return {"id": np.array([str(r["id"]) for r in kept], dtype=object),
            "image": np.stack(images) if images else np.zeros((0, S, S), np.float32),
            "masks": masks, "weight": weight}
