"""`plabel label` as ONE Ray Data job.

    read_shards(unlabelled shards)   one streaming tar-parsing task per shard (shard_reader)
      -> decode_images               (CPU tasks)   bytes -> gray uint8, or an error row
      -> TeacherStage                (CPU actors)  U-Net, mask cleaning, prompt extraction
      -> repartition                 blocks of label.sam.batch_size rows (streaming, no shuffle)
      -> RefineStage                 (GPU actors when the cluster has GPUs, else CPU actors)
                                                   SAM refinement, quality gate, table rows
      -> driver: ShardTableWriter    one Parquet part per shard, then the completion marker
                                     (plabel.data.table_commit; plabel.schemas.tables)

The method itself lives in plabel.method.labelling; this module only schedules it. Rows are never
dropped: an image that fails to decode or to process becomes a row with status 'error' and a
message naming the input, so images in = ok + empty + error rows.

The table is written shard by shard (plabel.data.table_commit): the driver takes the rows
as Ray Data produces them, groups them by input shard and writes each finished shard as one
Parquet part, atomically, into the table's staging location; a job interrupted at any point and
started again with the same settings reads only the shards without a part. When every shard has
its part, the completion marker ``_plabel_complete.json`` (format, row counts, the teacher's
SHA-256, the Parquet file names) is written last; readers take exactly the files it lists.

* local disk: parts go to ``.<name>.inprogress/`` next to the output, which is renamed into place
  (``os.replace``) once the marker is in it: the table appears whole or not at all.
* object stores have no atomic folder rename: parts go straight under the output prefix (one PUT
  each) and the marker is written LAST (one PUT, atomic). A prefix without the marker is an
  unfinished table: readers refuse it (:class:`IncompleteTableError`, naming the marker) and the
  next label job resumes it (same settings) or replaces it.
  Local tables written before the marker existed (a folder without one) are still read.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa
import ray
import torch

from plabel.data import storage
from plabel.data.samples import batch_samples, decode_gray, object_array, sample_id, sample_uid
from plabel.data.shards import masks_shape
from plabel.data.table_commit import ShardTableWriter, job_fingerprint
from plabel.jobs.cluster import cluster_cpus, cluster_gpus, quiet_ray_data
from plabel.jobs.resources import label_requests, plan_label, ray_remote_args
from plabel.jobs.shard_dataset import read_shards
from plabel.method.cleaning import CleaningConfig
from plabel.method.gate import GateConfig
from plabel.method.labelling import (
    NONFINITE_TEACHER,
    ImageMeta,
    clean_and_prompt,
    empty_row,
    pseudo_label_rows,
    teacher_probs,
    teacher_view,
)
from plabel.method.prompts import RefinementPrompts
from plabel.method.sam import refiner_from_config
from plabel.method.unet import checkpoint_sha256, load_checkpoint
from plabel.schemas.tables import PSEUDO_LABEL_SCHEMA_VERSION, pseudo_label_schema

log = logging.getLogger(__name__)

_META_COLUMNS = ("id", "shard", "key", "height", "width", "sop_instance_uid", "status", "message")


def _meta(batch: dict, i: int) -> ImageMeta:
    ok = batch["status"][i] == "ok"
    return ImageMeta(
        id=str(batch["id"][i]), shard=batch["shard"][i], key=batch["key"][i],
        height=int(batch["height"][i]), width=int(batch["width"][i]),
        sop_instance_uid=_text(batch["sop_instance_uid"][i]),
        note=_text(batch["message"][i]) if ok else None,  # a warning on an image that is still labelled
    )


def _text(value) -> str | None:
    """A message cell as str or None (a column of only nulls may reach a stage as float NaN)."""
    return value if isinstance(value, str) else None


def per_image(indices: list[int], process: Callable[[list[int]], list],
              on_error: Callable[[int, Exception], None]) -> dict:
    """``{i: result}`` of ``process(indices)`` (one result per index, in order); when the batch call
    raises, each index is processed alone and ``on_error(i, exc)`` is called for those that still fail
    (they get no result), so one bad image never costs the rest of its batch."""
    try:
        return dict(zip(indices, process(indices)))
    except Exception:  # noqa: BLE001 - isolate the failing image(s)
        results = {}
        for i in indices:
            try:
                results[i] = process([i])[0]
            except Exception as e:  # noqa: BLE001
                on_error(i, e)
        return results


def _fail(batch: dict, i: int, reason: str) -> None:
    """Mark row ``i`` of a batch as an error whose message names its shard and key."""
    batch["status"][i] = "error"
    batch["message"][i] = f"{batch['shard'][i]}:{batch['key'][i]}: {reason}"


def _writable_status(batch: dict) -> None:
    """Make 'status' and 'message' writable object arrays of str / None (Ray may hand the stage
    read-only arrays, and an all-null message column as floats)."""
    for name in ("status", "message"):
        batch[name] = object_array([_text(v) for v in batch[name]])


def decode_images(batch: dict, max_pixels: int = 64_000_000) -> dict:
    """Samples (numpy batch of plabel.data.shard_reader rows) -> id, shard, key, size,
    sop_instance_uid (a DICOM source's, from the sample's JSON as ingest wrote it; else None),
    status, message and 'image' (gray uint8 (H, W); a 1x1 placeholder on error rows).

    Error rows (message ``<shard>:<key>: <reason>``): samples the reader marked unusable
    (truncated, duplicate key -> id ``<id>#<n>``, unsafe member name, ...), undecodable images
    (zero-byte, corrupt, truncated, unsupported), images under imageio.MIN_SIDE on a side or above
    ``max_pixels`` (``label.max_image_pixels``). Ground-truth ``masks.npz`` is not used here; one
    whose size differs from its image only adds a warning to the message of the (still labelled)
    row."""

    out = {k: [] for k in _META_COLUMNS + ("image",)}
    for sample in batch_samples(batch):
        key = str(sample["__key__"])
        shard = str(sample["__url__"]) if "__url__" in sample else None
        row_id, status, message, image = key, "ok", None, np.zeros((1, 1), np.uint8)
        try:
            row_id = sample_id(sample)
        except Exception as e:  # noqa: BLE001 - unreadable JSON: the (unique) row key names the row
            if sample.get("__error__") is None:
                status, message = "error", f"{shard}:{key}: json: {type(e).__name__}: {e}"
        if status == "ok":
            try:
                image = decode_gray(sample, max_pixels=max_pixels)
            except Exception as e:  # noqa: BLE001 - every failure becomes an error row naming the input
                status = "error"
                reason = sample.get("__error__") or f"{type(e).__name__}: {e}"
                message = f"{shard}:{key}: {reason}"
        if status == "ok" and "masks.npz" in sample:
            message = _ground_truth_note(sample, image.shape, f"{shard}:{key}")
        out["id"].append(row_id)
        out["shard"].append(shard)
        out["key"].append(key)
        out["height"].append(image.shape[0] if status == "ok" else 0)
        out["width"].append(image.shape[1] if status == "ok" else 0)
        out["sop_instance_uid"].append(sample_uid(sample))
        out["status"].append(status)
        out["message"].append(message)
        out["image"].append(image)
    return {k: np.asarray(v, dtype=np.int32) if k in ("height", "width") else object_array(v) for k, v in out.items()}


def _ground_truth_note(sample: dict, shape, where: str) -> str | None:
    """None, or a warning when the sample's ground-truth masks do not fit its image (the label job
    does not use them; the image is labelled all the same)."""

    try:
        _, h, w = masks_shape(bytes(sample["masks.npz"]))
    except Exception as e:  # noqa: BLE001
        note = f"warning: {where}.masks.npz (ground truth) is unreadable and ignored: {e}"
    else:
        if (h, w) == tuple(shape):
            return None
        note = (f"warning: {where}.masks.npz (ground truth) is {h}x{w} (HxW) but the image is "
                f"{shape[0]}x{shape[1]}; ignored")
    log.warning("%s", note)
    return note


class TeacherStage:
    """CPU actor: U-Net probabilities, cleaning and prompts for a batch of decoded images."""

    def __init__(self, checkpoint: str, cleaning: dict, num_classes: int, threads: int = 1):
        torch.set_num_threads(max(1, threads))
        self.model, self.config, self.extra = load_checkpoint(checkpoint)
        self.image_size = int(self.extra.get("image_size", 256))
        self.cleaning = CleaningConfig(**cleaning)
        self.C = num_classes

    def _process(self, images: list[np.ndarray]):
        """Per image: (cleaned, unet_prob, prompts), or None when its probabilities are not finite."""
        probs = teacher_probs(self.model, images, self.image_size, nonfinite="none")  # images: teacher_view
        return [None if p is None else clean_and_prompt(p, self.cleaning) for p in probs]

    def __call__(self, batch: dict) -> dict:
        _writable_status(batch)
        n = len(batch["id"])
        C = self.C
        ok = [i for i in range(n) if batch["status"][i] == "ok"]
        images = list(batch["image"])  # each ok image as the teacher reads it, which RefineStage gives SAM
        for i in ok:
            images[i] = teacher_view(self.model, [images[i]])[0]
        batch["image"] = object_array(images)
        results = per_image(ok, lambda idx: self._process([batch["image"][i] for i in idx]),
                            lambda i, e: _fail(batch, i, f"teacher: {type(e).__name__}: {e}"))
        for i in ok:
            if i in results and results[i] is None:
                batch["status"][i] = "error"
                batch["message"][i] = f"{batch['shard'][i]}:{batch['key'][i]}: {NONFINITE_TEACHER}"
        cleaned = [None] * n
        unet_prob = np.full((n, C), np.nan, np.float32)
        boxes = np.zeros((n, C, 4), np.float32)
        points = np.zeros((n, C, C, 2), np.float32)
        labels = np.full((n, C, C), -1, np.int32)
        valid = np.zeros((n, C), bool)
        for i in range(n):
            if i in results and batch["status"][i] == "ok":
                m, up, pr = results[i]
                cleaned[i] = np.packbits(m, axis=-1)
                unet_prob[i] = up
                boxes[i] = pr.boxes
                P = pr.points.shape[1]
                points[i, :, :P] = pr.points
                labels[i, :, :P] = pr.point_labels
                valid[i] = pr.valid
            else:
                cleaned[i] = np.zeros((C, 1, 1), np.uint8)
        batch.update(cleaned=object_array(cleaned), unet_prob=unet_prob, boxes=boxes, points=points,
                     point_labels=labels, valid=valid)
        return batch


class RefineStage:
    """SAM actor (GPU when available): refinement, quality gate, pyarrow table of rows. sam None: the
    gate consults SAM for no class, so no SAM is loaded and the rows say none ran (null provenance)."""

    def __init__(self, sam: dict | None, gate: dict, classes: Sequence[str], unet_sha256: str,
                 cache_dir: str | None = None):
        if not torch.cuda.is_available():
            torch.set_num_threads(max(1, int((sam or {}).get("cpus", 1))))

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.refiner = None if sam is None else refiner_from_config(sam, device, cache_dir=cache_dir)
        model = None if self.refiner is None else self.refiner.model
        self.gate = GateConfig.from_dict(gate)
        self.classes = list(classes)
        self.provenance = {
            "unet_checkpoint_sha256": unet_sha256,
            "sam_backend": None if model is None else model.backend,
            "sam_checkpoint_sha256": None if model is None else model.checkpoint_sha256,
        }

        self.schema = pseudo_label_schema(self.classes)

    def _rows(self, batch: dict, idx: list[int]) -> list[dict]:
        metas, grays, cleaned, probs, prompts = [], [], [], [], []
        for i in idx:
            meta = _meta(batch, i)
            metas.append(meta)
            grays.append(batch["image"][i])
            cleaned.append(np.unpackbits(batch["cleaned"][i], axis=-1, count=meta.width).astype(bool))
            probs.append(batch["unet_prob"][i])
            prompts.append(RefinementPrompts(batch["boxes"][i], batch["points"][i],
                                             batch["point_labels"][i], batch["valid"][i]))
        return pseudo_label_rows(self.refiner, grays, cleaned, probs, prompts, metas, self.classes,
                                 self.gate, self.provenance)

    def __call__(self, batch: dict):
        _writable_status(batch)
        n = len(batch["id"])
        ok = [i for i in range(n) if batch["status"][i] == "ok"]
        rows = per_image(ok, lambda idx: self._rows(batch, idx),
                         lambda i, e: _fail(batch, i, f"sam: {type(e).__name__}: {e}"))
        out = []
        for i in range(n):
            if i in rows:
                out.append(rows[i])
            else:
                out.append(empty_row(_meta(batch, i), self.classes, "error", batch["message"][i], self.provenance))
        return pa.Table.from_pylist(out, schema=self.schema)


def _job_settings(classes, unet_sha256: str, label_cfg) -> dict:
    """What the rows depend on: a staged table is resumed only by a job with the same settings."""

    sam = label_cfg.sam
    checkpoint = sam.checkpoint
    return {
        "schema_version": PSEUDO_LABEL_SCHEMA_VERSION,
        "classes": list(classes),
        "unet_checkpoint_sha256": unet_sha256,
        "sam": {"backend": sam.backend, "sha256": sam.sha256, "stages": [list(x) for x in sam.stages],
                "autocast": sam.autocast,
                "checkpoint": None if checkpoint is None else storage.redact(str(checkpoint))},
        "cleaning": label_cfg.cleaning.model_dump(),
        "gate": label_cfg.gate.to_gate_dict(),
    }


def label_settings(classes, teacher_checkpoint: str, label_cfg) -> dict:
    """What a label job's rows depend on besides its shards: classes, the teacher's hash, SAM,
    cleaning and the gate (wherever the files lie: a run directory can move)."""
    return _job_settings(classes, checkpoint_sha256(teacher_checkpoint), label_cfg)


def label_job_fingerprint(shards: Sequence[str], classes, teacher_checkpoint: str, label_cfg) -> str:
    """The fingerprint of a label job (its shards, classes, teacher, SAM, cleaning and gate), as its
    completion marker records it under ``job_fingerprint``: equal fingerprints, equal rows."""
    return job_fingerprint(label_settings(classes, teacher_checkpoint, label_cfg), shards)


def run_label_job(
    shards: Sequence[str],
    out_dir: str | Path,
    classes: Sequence[str],
    teacher_checkpoint: str,
    label_cfg,
    cache_dir: str | None = None,
    progress: Callable[[int, int | None], None] | None = None,
) -> dict:
    """Run the labelling job into out_dir (a local folder or a URI), shard by shard (see the module
    docstring); a job interrupted earlier with the same settings is resumed. Returns counts
    {rows, ok, empty, error}, wall time, and shards / shards_skipped (committed by an earlier run).
    ``progress(n, total)`` is called on the driver with the rows of every block that arrives and the
    rows the job expects (the samples of the shards it labels; None when a shard cannot be listed)."""

    quiet_ray_data()
    out = str(out_dir).rstrip("/") if storage.is_remote(out_dir) else str(Path(storage.local_path(out_dir)).absolute())
    t0 = time.time()
    unet_sha256 = checkpoint_sha256(teacher_checkpoint)
    writer = ShardTableWriter(out, shards, pseudo_label_schema(classes), _job_settings(classes, unet_sha256, label_cfg))
    remaining = writer.prepare()
    sam = label_cfg.sam
    gpus = cluster_gpus()
    keys = writer.expected.values()  # per remaining shard: its sample keys, None when unknown
    total = None if any(k is None for k in keys) else sum(len(k) for k in keys)
    needs_sam = GateConfig.from_dict(label_cfg.gate.to_gate_dict()).consults_sam(classes)
    plan = plan_label(label_cfg, cluster_cpus(), gpus, total, needs_sam=needs_sam)
    log.info("label plan: %s", plan.why)
    requests = {r.stage: r for r in label_requests(label_cfg, cluster_has_gpu=gpus > 0, sam_actors=plan.sam_actors,
                                                   needs_sam=needs_sam)}
    if remaining:
        # Fault tolerance is Ray Data's: read and decode tasks are retried (max_retries=-1), the
        # map actors are restarted (max_restarts=-1) and re-run their lost tasks
        # (max_task_retries=-1), and a lost block is rebuilt from its lineage; these are Ray
        # Data's defaults for map_batches (tests/faults kills actors and nodes mid-job). Rows a
        # retry delivers twice are dropped by the writer (same shard, same key).
        ds = read_shards(remaining)
        ds = ds.map_batches(decode_images, fn_kwargs={"max_pixels": label_cfg.max_image_pixels},
                            batch_format="numpy", batch_size=16, **ray_remote_args(requests["decode"].resources))
        ds = ds.map_batches(
            TeacherStage,
            fn_constructor_kwargs=dict(checkpoint=str(teacher_checkpoint), cleaning=label_cfg.cleaning.model_dump(),
                                       num_classes=len(classes)),
            batch_format="numpy", batch_size=label_cfg.unet_batch_size, compute=ray.data.ActorPoolStrategy(size=requests["teacher"].count),
            **ray_remote_args(requests["teacher"].resources),
        )
        # SAM tasks of one batch each (blocks were whole shards): the actors share the work evenly,
        # the first rows come back after one batch, and the last actor's tail is one batch long
        ds = ds.repartition(target_num_rows_per_block=sam.batch_size)
        ds = ds.map_batches(
            RefineStage,
            fn_constructor_kwargs=dict(sam={**sam.model_dump(), "compile": plan.compile} if needs_sam else None,
                                       gate=label_cfg.gate.to_gate_dict(),
                                       classes=list(classes), unet_sha256=unet_sha256, cache_dir=cache_dir),
            batch_format="numpy", batch_size=sam.batch_size, compute=ray.data.ActorPoolStrategy(size=requests["refine"].count),
            **ray_remote_args(requests["refine"].resources),
        )
        if progress is not None:
            progress(0, total)
        for block in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2):
            writer.add(block)  # writes each shard's part as soon as its last row arrived
            if progress is not None:
                progress(block.num_rows, total)
    counts = writer.finish({"unet_checkpoint_sha256": unet_sha256, "job_fingerprint": writer.fingerprint})
    return {**counts, "wall_s": round(time.time() - t0, 2), **plan.as_dict(),
            "shards": len(writer.shards), "shards_skipped": writer.skipped,
            "duplicates_dropped": writer.duplicates_dropped, "missing_samples": writer.missing_samples}
