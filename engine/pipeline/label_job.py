"""`plabel label` as ONE Ray Data job.

    read_webdataset(unlabelled shards)
      -> decode_images               (CPU tasks)   bytes -> gray uint8, or an error row
      -> TeacherStage                (CPU actors)  U-Net, mask cleaning, prompt extraction
      -> RefineStage                 (GPU actors when the cluster has GPUs, else CPU actors)
                                                   SAM refinement, quality gate, table rows
      -> write_parquet               the pseudo-label table (schemas.tables)

The method itself lives in engine.labelling; this module only schedules it. Rows are never
dropped: an image that fails to decode or to process becomes a row with status 'error' and a
message naming the input, so images in = ok + empty + error rows.

The table is committed all at once (shards, table and teacher may be local paths or URIs, see
engine.storage). Every table ends with a completion marker, ``_plabel_complete.json`` (format,
row counts, the teacher's SHA-256, the Parquet file names); readers take exactly the files it
lists.

* local disk: the job writes into ``.<name>.tmp-<id>/`` next to the output, adds the marker and
  renames the folder into place (``os.replace``): the table appears whole or not at all.
* object stores have no atomic folder rename: the job writes into the prefix
  ``.<name>.tmp-<id>/``, copies the files to the output prefix, and writes the marker LAST (one
  PUT, atomic). A prefix holding files but no marker is an interrupted commit: readers refuse it
  (:class:`IncompleteTableError`, naming the marker) and the next label job overwrites it.
  Local tables written before the marker existed (a folder without one) are still read.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Sequence

import numpy as np

from engine import storage
from engine.labelling import ImageMeta, clean_and_prompt, empty_row, pseudo_label_rows, teacher_probs
from engine.pipeline.samples import batch_samples, decode_gray, object_array

log = logging.getLogger(__name__)

_META_COLUMNS = ("id", "shard", "key", "height", "width", "status", "message")

MARKER_NAME = "_plabel_complete.json"  # '_' prefix: pyarrow and Ray Data skip it when reading the folder
MARKER_FORMAT = "plabel-pseudo-labels"


class IncompleteTableError(RuntimeError):
    """A pseudo-label table in object storage without its completion marker (interrupted commit)."""


def _meta(batch: dict, i: int) -> ImageMeta:
    return ImageMeta(
        id=str(batch["id"][i]), shard=batch["shard"][i], key=batch["key"][i],
        height=int(batch["height"][i]), width=int(batch["width"][i]),
    )


def decode_images(batch: dict, max_pixels: int = 64_000_000) -> dict:
    """WebDataset samples (numpy batch of raw members) -> id, shard, key, size, status, message and
    'image' (gray uint8 (H, W); a 1x1 placeholder on error rows)."""
    out = {k: [] for k in _META_COLUMNS + ("image",)}
    for sample in batch_samples(batch):
        key = str(sample["__key__"])
        shard = str(sample["__url__"]) if "__url__" in sample else None
        sample_id, status, message, image = key, "ok", None, np.zeros((1, 1), np.uint8)
        try:
            if "json" in sample:
                sample_id = str(json.loads(bytes(sample["json"]))["id"])
            image = decode_gray(sample, max_pixels=max_pixels)
        except Exception as e:  # noqa: BLE001 - every failure becomes an error row naming the input
            status, message = "error", f"{shard}:{key}: {type(e).__name__}: {e}"
        out["id"].append(sample_id)
        out["shard"].append(shard)
        out["key"].append(key)
        out["height"].append(image.shape[0] if status == "ok" else 0)
        out["width"].append(image.shape[1] if status == "ok" else 0)
        out["status"].append(status)
        out["message"].append(message)
        out["image"].append(image)
    return {k: np.asarray(v, dtype=np.int32) if k in ("height", "width") else object_array(v) for k, v in out.items()}


class TeacherStage:
    """CPU actor: U-Net probabilities, cleaning and prompts for a batch of decoded images."""

    def __init__(self, checkpoint: str, cleaning: dict, num_classes: int, threads: int = 1):
        import torch

        from engine.cleaning import CleaningConfig
        from engine.unet import load_checkpoint

        torch.set_num_threads(max(1, threads))
        self.model, self.config, self.extra = load_checkpoint(checkpoint)
        self.image_size = int(self.extra.get("image_size", 256))
        self.cleaning = CleaningConfig(**cleaning)
        self.C = num_classes

    def _process(self, images: list[np.ndarray]):
        probs = teacher_probs(self.model, images, self.image_size)
        return [clean_and_prompt(p, self.cleaning) for p in probs]

    def __call__(self, batch: dict) -> dict:
        n = len(batch["id"])
        C = self.C
        ok = [i for i in range(n) if batch["status"][i] == "ok"]
        results: dict[int, tuple] = {}
        try:
            results = dict(zip(ok, self._process([batch["image"][i] for i in ok])))
        except Exception:  # noqa: BLE001 - isolate the failing image(s)
            for i in ok:
                try:
                    results[i] = self._process([batch["image"][i]])[0]
                except Exception as e:  # noqa: BLE001
                    batch["status"][i] = "error"
                    batch["message"][i] = f"{batch['shard'][i]}:{batch['key'][i]}: teacher: {type(e).__name__}: {e}"
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
    """SAM actor (GPU when available): refinement, quality gate, pyarrow table of rows."""

    def __init__(self, sam: dict, gate: dict, classes: Sequence[str], unet_sha256: str, cache_dir: str | None = None):
        import torch

        if not torch.cuda.is_available():
            torch.set_num_threads(max(1, int(sam.get("cpus", 1))))

        from engine.gate import GateConfig
        from engine.sam import SamRefiner, load_sam

        device = "cuda" if torch.cuda.is_available() else "cpu"
        autocast = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[sam.get("autocast", "none")]
        model = load_sam(sam["backend"], sam.get("checkpoint"), device=device, cache_dir=cache_dir,
                         sha256=sam.get("sha256"))
        stages = tuple(tuple(s) for s in sam["stages"])
        self.refiner = SamRefiner(model, stages=stages, autocast_dtype=autocast if device == "cuda" else None)
        self.gate = GateConfig.from_dict(gate)
        self.classes = list(classes)
        self.provenance = {
            "unet_checkpoint_sha256": unet_sha256,
            "sam_backend": model.backend,
            "sam_checkpoint_sha256": model.checkpoint_sha256,
        }
        from schemas.tables import pseudo_label_schema

        self.schema = pseudo_label_schema(self.classes)

    def _rows(self, batch: dict, idx: list[int]) -> list[dict]:
        from engine.prompts import RefinementPrompts

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
        import pyarrow as pa

        n = len(batch["id"])
        ok = [i for i in range(n) if batch["status"][i] == "ok"]
        rows: dict[int, dict] = {}
        try:
            rows = dict(zip(ok, self._rows(batch, ok)))
        except Exception:  # noqa: BLE001 - isolate the failing image(s)
            for i in ok:
                try:
                    rows[i] = self._rows(batch, [i])[0]
                except Exception as e:  # noqa: BLE001
                    batch["status"][i] = "error"
                    batch["message"][i] = f"{batch['shard'][i]}:{batch['key'][i]}: sam: {type(e).__name__}: {e}"
        out = []
        for i in range(n):
            if i in rows:
                out.append(rows[i])
            else:
                out.append(empty_row(_meta(batch, i), self.classes, "error", batch["message"][i], self.provenance))
        return pa.Table.from_pylist(out, schema=self.schema)


def table_marker(table_dir) -> dict | None:
    """The table's completion marker (a dict), or None when there is none."""
    marker = storage.join(str(table_dir), MARKER_NAME)
    try:
        return json.loads(storage.read_text(marker))
    except FileNotFoundError:
        return None


def table_files(table_dir) -> tuple:
    """``(pyarrow filesystem or None for local paths, Parquet file paths)`` of a finished table.

    The files are those the marker lists. Raises FileNotFoundError when there is no table and
    IncompleteTableError for files in object storage without a marker.
    """
    table_dir = str(table_dir)
    marker = table_marker(table_dir)
    name = storage.redact(table_dir)
    if marker is None:
        if storage.is_remote(table_dir):
            if storage.list_files(table_dir):
                raise IncompleteTableError(
                    f"{name}: the pseudo-label table is incomplete: it has no "
                    f"{storage.join(name, MARKER_NAME)} (an interrupted write?); run the label job again")
            raise FileNotFoundError(f"{name}: no pseudo-label table there")
        if not Path(storage.local_path(table_dir)).is_dir():
            raise FileNotFoundError(f"{name}: no pseudo-label table there")
        files = storage.list_files(storage.local_path(table_dir), ".parquet")
    else:
        if marker.get("format") != MARKER_FORMAT or not isinstance(marker.get("files"), list):
            raise IncompleteTableError(f"{storage.join(name, MARKER_NAME)}: not a plabel completion marker")
        files = [storage.join(table_dir, *f.split("/")) for f in marker["files"]]
    return storage.resolve_all(files)


def _clear_output(out: str) -> None:
    """Refuse a finished table at ``out``; delete stale temp folders and an interrupted commit."""
    name = storage.redact(out)
    if storage.is_remote(out):
        if "/" not in name.split("://", 1)[1].strip("/"):
            raise ValueError(f"{name}: give the table a prefix inside the bucket, not the bucket itself")
        if table_marker(out) is not None:
            raise FileExistsError(f"{name}: the pseudo-label table exists already; remove it or choose another output")
        leftover = storage.list_files(out)
        if any(not f.split("?")[0].endswith(".parquet") for f in leftover):
            raise FileExistsError(f"{name} holds files that are not a plabel table; choose another output")
        if leftover:
            log.warning("%s: Parquet files without %s (an interrupted commit); overwriting them", name, MARKER_NAME)
            storage.delete_dir(out)
        prefix = f".{out.rstrip('/').split('?')[0].rsplit('/', 1)[-1]}.tmp-"
        for entry in storage.list_dir(storage.dirname(out)):
            if storage.redact(entry).rstrip("/").rsplit("/", 1)[-1].startswith(prefix):
                storage.delete_dir(entry)
        return
    out_dir = Path(out)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir}: the pseudo-label table exists already; remove it or choose another output")
    for stale in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):  # left by an interrupted run
        shutil.rmtree(stale, ignore_errors=True)


def _commit_table(tmp: str, out: str, counts: dict) -> None:
    """Move the table written to ``tmp`` to ``out``, marker included (see the module docstring)."""
    files = storage.list_files(tmp, ".parquet")
    rel = [storage.redact(f)[len(storage.redact(tmp)):].lstrip("/") if storage.is_uri(f) else os.path.relpath(f, tmp)
           for f in files]
    marker = {"format": MARKER_FORMAT, "version": 1, **counts, "files": [r.replace(os.sep, "/") for r in rel]}
    text = json.dumps(marker, indent=2, sort_keys=True) + "\n"
    if not storage.is_remote(out):
        storage.write_text(storage.join(tmp, MARKER_NAME), text)
        os.replace(tmp, out)
        return
    for f, r in zip(files, marker["files"]):
        storage.copy_file(f, storage.join(out, *r.split("/")))
    storage.write_text(storage.join(out, MARKER_NAME), text)  # last: the commit point
    storage.delete_dir(tmp)


def run_label_job(
    shards: Sequence[str],
    out_dir: str | Path,
    classes: Sequence[str],
    teacher_checkpoint: str,
    label_cfg,
    cache_dir: str | None = None,
) -> dict:
    """Run the labelling job; commits the Parquet table to out_dir (a local folder or a URI) at once
    when the job finished (see the module docstring). Returns counts {rows, ok, empty, error} and
    wall time."""
    import pyarrow.dataset as pads
    import ray

    from engine.pipeline.cluster import cluster_gpus, quiet_ray_data
    from engine.pipeline.resources import label_requests, ray_remote_args
    from engine.pipeline.shard_reader import read_shards
    from engine.unet import checkpoint_sha256

    quiet_ray_data()
    out = str(out_dir).rstrip("/") if storage.is_remote(out_dir) else str(Path(storage.local_path(out_dir)))
    _clear_output(out)
    tmp_name = f".{storage.redact(out).rstrip('/').rsplit('/', 1)[-1]}.tmp-{uuid.uuid4().hex[:8]}"
    tmp = storage.join(storage.dirname(out), tmp_name)
    t0 = time.time()
    unet_sha256 = checkpoint_sha256(teacher_checkpoint)
    sam = label_cfg.sam
    gpus = cluster_gpus()
    requests = {r.stage: r for r in label_requests(label_cfg, cluster_has_gpu=gpus > 0)}
    ds = read_shards(shards)
    ds = ds.map_batches(decode_images, batch_format="numpy", batch_size=16,
                        **ray_remote_args(requests["decode"].resources))
    ds = ds.map_batches(
        TeacherStage,
        fn_constructor_kwargs=dict(checkpoint=str(teacher_checkpoint), cleaning=label_cfg.cleaning.__dict__,
                                   num_classes=len(classes)),
        batch_format="numpy", batch_size=label_cfg.unet_batch_size, compute=ray.data.ActorPoolStrategy(size=requests["teacher"].count),
        **ray_remote_args(requests["teacher"].resources),
    )
    ds = ds.map_batches(
        RefineStage,
        fn_constructor_kwargs=dict(sam=sam.__dict__, gate=label_cfg.gate.to_gate_dict(), classes=list(classes),
                                   unet_sha256=unet_sha256, cache_dir=cache_dir),
        batch_format="numpy", batch_size=sam.batch_size, compute=ray.data.ActorPoolStrategy(size=requests["refine"].count),
        **ray_remote_args(requests["refine"].resources),
    )
    fs, (tmp_path,) = storage.resolve_all([tmp])
    try:
        if fs is None:
            ds.write_parquet(tmp_path)
        else:
            ds.write_parquet(tmp_path, filesystem=fs)
        files_fs, files = storage.resolve_all(storage.list_files(tmp, ".parquet"))
        table = pads.dataset(files, filesystem=files_fs, format="parquet").to_table(columns=["status"])
        status = table.column("status").to_pylist()
        counts = {"rows": len(status), **{s: status.count(s) for s in ("ok", "empty", "error")}}
        _commit_table(tmp, out, {**counts, "unet_checkpoint_sha256": unet_sha256})
    except BaseException:
        storage.delete_dir(tmp)
        raise
    return {**counts, "wall_s": round(time.time() - t0, 2), "sam_on_gpu": "GPU" in requests["refine"].resources}


def read_pseudo_labels(table_dir: str | Path):
    """The whole pseudo-label table as a pyarrow.Table with plabel's schema metadata.

    Raises IncompleteTableError for a table without its completion marker in object storage."""
    import pyarrow.dataset as pads

    fs, files = table_files(table_dir)
    return pads.dataset(files, filesystem=fs, format="parquet").to_table()
