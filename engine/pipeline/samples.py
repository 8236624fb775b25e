"""Rows of Ray Data's read_webdataset batches as WebDataset samples (no Ray needed).

Every job reads shards with ``decoder=None, include_paths=True``: a numpy batch of raw members
(``__key__``, ``__url__``, ``png``, ``json``, ``masks.npz`` ...), one row per sample.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np


def batch_samples(batch: dict) -> Iterator[dict]:
    """The samples of a batch, each a dict of the members it has (absent members left out)."""
    for i in range(len(batch["__key__"])):
        yield {k: batch[k][i] for k in batch if batch[k][i] is not None}


def sample_where(sample: dict) -> str:
    """'<shard>:<key>', how errors name a sample."""
    return f"{sample.get('__url__')}:{sample['__key__']}"


def decode_gray(sample: dict, max_pixels: int = 64_000_000) -> np.ndarray:
    """The sample's image as gray uint8 (H, W) (16-bit images min-max scaled); raises naming it."""
    from engine.imageio import decode_image, to_gray_float
    from engine.shards import image_member

    name, data = image_member(sample)
    image = decode_image(bytes(data), f"{sample_where(sample)}.{name}", max_pixels=max_pixels)
    return np.round(to_gray_float(image) * 255.0).astype(np.uint8)


def object_array(values: Sequence) -> np.ndarray:
    """1-D object array of arbitrary values (strings, bytes, ragged arrays) for a Ray batch."""
    arr = np.empty(len(values), dtype=object)
    arr[:] = list(values)
    return arr
