"""Rows of plabel.data.shard_reader batches as WebDataset samples (no Ray needed).

Every job reads shards with ``plabel.jobs.shard_dataset.read_shards``: a numpy batch of raw members
(``__key__``, ``__url__``, ``png``, ``json``, ``masks.npz`` ...), one row per sample, plus
``__error__`` (why the reader could not give a usable sample), ``__occurrence__`` and ``__id__``.
"""
from __future__ import annotations

import json
from typing import Iterator, Sequence

import numpy as np

from plabel.data.imageio import decode_image, to_gray_float
from plabel.data.shards import ShardError, decode_masks, image_member
from plabel.errors import InputError


def batch_samples(batch: dict) -> Iterator[dict]:
    """The samples of a batch, each a dict of the members it has (absent members left out)."""
    for i in range(len(batch["__key__"])):
        yield {k: batch[k][i] for k in batch if batch[k][i] is not None}


def sample_where(sample: dict) -> str:
    """'<shard>:<key>', how errors name a sample."""
    return f"{sample.get('__url__')}:{sample['__key__']}"


def sample_id(sample: dict) -> str:
    """The row id of a sample: ``__id__`` when the reader set one, else the JSON member's ``id``
    (else the key), with ``#<n>`` appended for the n-th (n >= 2) sample of a repeated key.
    Raises when the JSON member is not valid JSON with an ``id``."""
    fixed = sample.get("__id__")
    if fixed is not None:
        return str(fixed)
    base = str(sample["__key__"])
    if "json" in sample:
        base = str(json.loads(bytes(sample["json"]))["id"])
    occurrence = int(sample.get("__occurrence__") or 1)
    return base if occurrence <= 1 else f"{base}#{occurrence}"


def sample_uid(sample: dict) -> str | None:
    """The DICOM SOPInstanceUID that ingest kept in the sample's JSON member; None when there is
    none (not a DICOM source, no or unreadable JSON: the row's id and message say the rest)."""
    try:
        uid = json.loads(bytes(sample["json"])).get("sop_instance_uid") if "json" in sample else None
    except Exception:  # noqa: BLE001 - decode_images reports unreadable JSON on the row itself
        return None
    return uid if isinstance(uid, str) and uid else None


def check_sample(sample: dict) -> None:
    """Raise ShardError naming the sample when the reader marked it unusable (``__error__``)."""

    error = sample.get("__error__")
    if error is not None:
        raise ShardError(f"{sample_where(sample)}: {error}")


def decode_gray(sample: dict, max_pixels: int = 64_000_000) -> np.ndarray:
    """The sample's image as gray uint8 (H, W) (16-bit images min-max scaled); raises naming it
    (also for samples the reader marked unusable: truncated, duplicate key, unsafe member)."""

    check_sample(sample)
    name, data = image_member(sample)
    image = decode_image(bytes(data), f"{sample_where(sample)}.{name}", max_pixels=max_pixels)
    return np.round(to_gray_float(image) * 255.0).astype(np.uint8)


def sample_masks(sample: dict, shape: tuple[int, int], num_classes: int | None = None) -> np.ndarray:
    """The sample's ``masks.npz`` as bool (C, H, W), checked against the image's (H, W) and, when
    given, the class count; raises InputError naming the sample and both sizes."""

    where = sample_where(sample)
    if "masks.npz" not in sample:
        raise InputError(f"{where}: sample has no masks.npz member")
    try:
        masks = decode_masks(bytes(sample["masks.npz"]))
    except ShardError as e:
        raise InputError(f"{where}.masks.npz: {e}") from None
    if tuple(masks.shape[1:]) != tuple(shape):
        raise InputError(f"{where}: masks.npz is {masks.shape[1]}x{masks.shape[2]} (HxW) but the image is "
                         f"{shape[0]}x{shape[1]}")
    if num_classes is not None and masks.shape[0] != num_classes:
        raise InputError(f"{where}: masks.npz has {masks.shape[0]} classes, expected {num_classes}")
    return masks


def object_array(values: Sequence) -> np.ndarray:
    """1-D object array of arbitrary values (strings, bytes, ragged arrays) for a Ray batch."""
    arr = np.empty(len(values), dtype=object)
    arr[:] = list(values)
    return arr
