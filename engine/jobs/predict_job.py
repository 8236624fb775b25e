"""`plabel predict` as ONE Ray Data job: a U-Net applied to every image of a set of shards.

    read_shards            one streaming tar-parsing task per shard
      -> decode_images     (CPU tasks, the label job's)  bytes -> gray uint8, or an error row
      -> PredictStage      (CPU actors, or GPU actors when the cluster has GPUs)
                           U-Net probabilities -> masks (threshold, optional cleaning) -> rows
      -> driver            ShardTableWriter: one Parquet part per shard, the marker last

The same decode and U-Net code as ``plabel label`` (plabel.jobs.label_job.decode_images,
plabel.method.labelling.teacher_probs) and the same masks as ``plabel evaluate`` scores
(plabel.method.prediction.predicted_masks). Rows are never dropped: an image that fails becomes an
``error`` row naming the input. An interrupted job started again with the same settings resumes.
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa
import ray
import torch

from plabel.data import storage
from plabel.data.table_commit import ShardTableWriter
from plabel.jobs.cluster import cluster_gpus, quiet_ray_data
from plabel.jobs.label_job import decode_images, per_image
from plabel.jobs.shard_dataset import read_shards
from plabel.method.labelling import NONFINITE_TEACHER, teacher_probs
from plabel.method.prediction import error_row, mask_confidence, predicted_masks, prediction_row
from plabel.method.unet import checkpoint_sha256, load_checkpoint
from plabel.schemas.tables import PREDICTION_SCHEMA_VERSION, prediction_schema


class PredictStage:
    """U-Net actor: masks of a batch of decoded images as prediction-table rows (pyarrow)."""

    def __init__(self, checkpoint: str, classes: Sequence[str], threshold: float, clean: bool, sha256: str):
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cpu":
            torch.set_num_threads(1)
        self.model, _, extra = load_checkpoint(checkpoint)
        self.model.to(self.device)
        self.image_size = int(extra.get("image_size", 256))
        self.classes, self.threshold, self.clean = list(classes), threshold, clean
        self.sha256 = sha256
        self.schema = prediction_schema(self.classes)

    def _image(self, batch: dict, i: int) -> dict:
        message = batch["message"][i]
        return {"id": str(batch["id"][i]), "shard": batch["shard"][i], "key": batch["key"][i],
                "height": int(batch["height"][i]), "width": int(batch["width"][i]),
                "sop_instance_uid": uid if isinstance(uid := batch["sop_instance_uid"][i], str) else None,
                "message": message if isinstance(message, str) else None, "unet_checkpoint_sha256": self.sha256}

    def _rows(self, batch: dict, idx: list[int]) -> list[dict]:
        probs = teacher_probs(self.model, [batch["image"][i] for i in idx], self.image_size, nonfinite="none")
        rows = []
        for i, p in zip(idx, probs):
            image = self._image(batch, i)
            if p is None:
                rows.append(error_row(image, f"{batch['shard'][i]}:{batch['key'][i]}: {NONFINITE_TEACHER}", self.classes))
                continue
            masks = predicted_masks(p, self.threshold, self.clean)
            rows.append(prediction_row(image, masks, mask_confidence(p, masks), self.classes))
        return rows

    def __call__(self, batch: dict):
        n = len(batch["id"])
        ok = [i for i in range(n) if batch["status"][i] == "ok"]
        failed: dict[int, dict] = {}
        rows = per_image(ok, lambda idx: self._rows(batch, idx), lambda i, e: failed.__setitem__(i, error_row(
            self._image(batch, i), f"{batch['shard'][i]}:{batch['key'][i]}: unet: {type(e).__name__}: {e}", self.classes)))
        rows.update(failed)
        out = [rows[i] if i in rows else error_row(self._image(batch, i), batch["message"][i], self.classes)
               for i in range(n)]
        return pa.Table.from_pylist(out, schema=self.schema)


def run_predict_job(shards: Sequence[str], out_dir: str, classes: Sequence[str], checkpoint: str,
                    threshold: float = 0.5, clean: bool = False, actors: int = 1, batch_size: int = 8,
                    max_image_pixels: int = 64_000_000,
                    progress: Callable[[int, int | None], None] | None = None) -> dict:
    """Predict every image of ``shards`` into the prediction table ``out_dir`` (local or URI).
    Returns counts {rows, ok, empty, error}, wall time, shards and shards_skipped (resumed)."""
    quiet_ray_data()
    out = str(out_dir).rstrip("/") if storage.is_remote(out_dir) else str(storage.local_path(out_dir))
    t0 = time.time()
    sha = checkpoint_sha256(checkpoint)
    settings = {"schema_version": PREDICTION_SCHEMA_VERSION, "table": "predictions", "classes": list(classes),
                "unet_checkpoint_sha256": sha, "threshold": float(threshold), "clean": bool(clean)}
    writer = ShardTableWriter(out, shards, prediction_schema(classes), settings)
    remaining = writer.prepare()
    gpu = cluster_gpus() > 0
    if remaining:
        ds = read_shards(remaining)
        ds = ds.map_batches(decode_images, fn_kwargs={"max_pixels": max_image_pixels}, batch_format="numpy",
                            batch_size=16, num_cpus=1)
        ds = ds.map_batches(PredictStage, fn_constructor_kwargs=dict(checkpoint=str(checkpoint), classes=list(classes),
                                                                     threshold=threshold, clean=clean, sha256=sha),
                            batch_format="numpy", batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=actors),
                            **({"num_gpus": 1} if gpu else {"num_cpus": 1}))
        keys = writer.expected.values()
        total = None if any(k is None for k in keys) else sum(len(k) for k in keys)
        if progress is not None:
            progress(0, total)
        for block in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2):
            writer.add(block)
            if progress is not None:
                progress(block.num_rows, total)
    counts = writer.finish({"unet_checkpoint_sha256": sha, "job_fingerprint": writer.fingerprint})
    return {**counts, "wall_s": round(time.time() - t0, 2), "on_gpu": gpu, "shards": len(writer.shards),
            "shards_skipped": writer.skipped}
