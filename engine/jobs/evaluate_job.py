"""`plabel evaluate`: Dice and HD95 of a U-Net checkpoint on labelled shards, as a Ray Data job.

Each image is predicted at the model's input size, the probabilities are resized back to the
image's own grid, thresholded (optionally cleaned: plabel.method.prediction.predicted_masks, the
masks `plabel predict` writes) and compared with the stored masks there. Only per-image Dice and
HD95 vectors (N x C floats) come back to the driver. HD95 is in pixels (shards do not record a
pixel spacing).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from plabel.data.samples import batch_samples, decode_gray, object_array, sample_masks, sample_where
from plabel.jobs.cluster import quiet_ray_data
from plabel.jobs.shard_dataset import read_shards
from plabel.method.labelling import teacher_probs
from plabel.method.metrics import dice_per_class, hd95_per_class, summarize_dice, summarize_hd95
from plabel.method.prediction import predicted_masks
from plabel.errors import InputError
from plabel.method.unet import checkpoint_sha256, load_checkpoint


_MODELS: dict = {}  # per worker process: (location, sha256) -> (model, extra); the last two used


def _model(checkpoint: str, sha256: str):
    """The checkpoint's model, loaded once per worker process and file content (the SHA-256 the
    driver computed: a file rewritten at the same path is loaded again)."""
    key = (checkpoint, sha256)
    if key not in _MODELS:
        while len(_MODELS) >= 2:
            _MODELS.pop(next(iter(_MODELS)))
        model, _, extra = load_checkpoint(checkpoint)
        _MODELS[key] = (model, extra)
    return _MODELS[key]


class DiceStage:
    """Per-image, per-class Dice and HD95 of one checkpoint on a batch of labelled samples."""

    def __init__(self, checkpoint: str, num_classes: int, threshold: float = 0.5, clean: bool = False,
                 sha256: str | None = None):
        torch.set_num_threads(1)
        if sha256 is None:
            self.model, _, extra = load_checkpoint(checkpoint)
        else:
            self.model, extra = _model(checkpoint, sha256)
        self.image_size = int(extra.get("image_size", 256))
        self.C, self.threshold, self.clean = num_classes, threshold, clean

    def __call__(self, batch: dict) -> dict:
        ids = []
        grays, truths, names = [], [], []
        for sample in batch_samples(batch):
            if "masks.npz" not in sample:
                raise InputError(f"{sample_where(sample)}: sample has no masks.npz member; evaluate needs labelled shards")
            gray = decode_gray(sample)
            grays.append(gray)
            truths.append(sample_masks(sample, gray.shape, self.C))  # raises naming the sample on a size mismatch
            ids.append(str(sample["__key__"]))
            names.append(sample_where(sample))
        probs = teacher_probs(self.model, grays, self.image_size, names=names)
        preds = [predicted_masks(p, self.threshold, self.clean) for p in probs]
        dices = [dice_per_class(p, t) for p, t in zip(preds, truths)]
        hd = [hd95_per_class(p, t) for p, t in zip(preds, truths)]
        return {"key": object_array(ids), "dice": np.asarray(dices, np.float64).reshape(len(ids), self.C),
                "hd95": np.asarray(hd, np.float64).reshape(len(ids), self.C)}


def dice_batch(batch: dict, checkpoint: str, sha256: str, num_classes: int, threshold: float, clean: bool) -> dict:
    """Ray Data task: :class:`DiceStage` of one batch. Tasks, not an actor pool: an evaluation is one
    short pass, and tasks run on Ray's already started workers (an actor pool starts new processes,
    about 3 s here), while the model is loaded once per worker (:func:`_model`)."""
    return DiceStage(checkpoint, num_classes, threshold, clean, sha256=sha256)(batch)


def evaluate_checkpoint(checkpoint: str, shards: Sequence[str], classes: Sequence[str], threshold: float = 0.5,
                        clean: bool = False, concurrency: int | None = None) -> dict:
    """summarize_dice of the checkpoint on the shards, plus 'per_image': {key: [dice per class]},
    'hd95': summarize_hd95 (pixels) and 'per_image_hd95': {key: [hd95 per class]}; nan (a class in
    only one of prediction and truth) is stored as None so the summary is plain JSON.

    checkpoint and shards may be local paths or URIs (plabel.data.storage); concurrency: at most this
    many tasks at a time (None: as many as the cluster's CPUs allow)."""

    quiet_ray_data()
    ds = read_shards(shards)
    ds = ds.map_batches(dice_batch, fn_kwargs=dict(checkpoint=str(checkpoint), sha256=checkpoint_sha256(checkpoint),
                                                   num_classes=len(classes), threshold=threshold, clean=clean),
                        batch_format="numpy", batch_size=8, concurrency=concurrency, num_cpus=1)
    rows = ds.take_all()
    rows.sort(key=lambda r: r["key"])
    per_image = np.array([r["dice"] for r in rows], dtype=np.float64).reshape(len(rows), len(classes))
    summary = summarize_dice(per_image, list(classes))
    summary["per_image"] = {r["key"]: [float(v) for v in r["dice"]] for r in rows}
    hd = np.array([r["hd95"] for r in rows], dtype=np.float64).reshape(len(rows), len(classes))
    summary["hd95"] = _json_safe(summarize_hd95(hd, list(classes)))
    summary["per_image_hd95"] = {r["key"]: _json_safe([float(v) for v in r["hd95"]]) for r in rows}
    return summary


def _json_safe(value):
    """nan -> None, recursively through dicts and lists (JSON has no nan)."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return None if isinstance(value, float) and np.isnan(value) else value
