"""The calibrate stage's work: the teacher and SAM label the validation images in this process (a
few images), and the quality gate is chosen per class against their ground truth
(plabel.method.calibration); the result is gate_policy.json, which the label stage applies."""
from __future__ import annotations

import logging
import os
import tempfile
from typing import Callable

import torch

from plabel.data import storage
from plabel.data.samples import decode_gray, sample_id, sample_masks, sample_where
from plabel.data.shard_reader import read_shard_file
from plabel.method.calibration import (POLICY_FILE, CalibrationObjective, GateGrid, GatePolicy, calibrate_gate,
                                       format_calibration, load_gate_policy, save_gate_policy,
                                       validation_evidence)
from plabel.method.cleaning import CleaningConfig
from plabel.method.gate import GateConfig
from plabel.method.sam import refiner_from_config
from plabel.method.unet import load_checkpoint
from plabel.schemas.config import LabelSection, RunConfig

log = logging.getLogger(__name__)

def read_labelled_images(shards, num_classes: int) -> tuple[list[str], list, list, list[str]]:
    """Read labelled shards in this process (a validation split: a few images).

    Returns ids, gray uint8 (H, W) images, ground truth bool (C, H, W), and messages naming the
    samples that could not be used (undecodable image, missing or misfitting masks)."""

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
    # Under `plabel submit` the driver runs in the job's working_dir, which can be gone by now
    # (seen after the teacher's Ray Train run); segment_anything's imports (torchvision ->
    # torch._dynamo) and checkpoint paths call os.getcwd(). Every config path is absolute already.
    try:
        os.getcwd()
    except FileNotFoundError:
        log.warning("the working directory no longer exists; continuing in %s", tempfile.gettempdir())
        os.chdir(tempfile.gettempdir())
    device = "cuda" if torch.cuda.is_available() and sam.device != "cpu" else "cpu"
    return refiner_from_config(sam.model_dump(), device, compile=False)  # few images: compiling costs more


def calibrate_stage(cfg: RunConfig, val_shards, classes, teacher_path: str, teacher_sha: str,
                    policy_path: str, echo: Callable[[str], None] = print) -> dict:
    """Calibrate the gate on the validation shards, write ``policy_path`` (gate_policy.json) and
    return the stage's results.json entry."""
    gate_cfg = cfg.label.gate
    ids, grays, truths, bad = read_labelled_images(val_shards, len(classes))
    for message in bad:
        echo(f"[calibrate] left out: {message}")
    model, _, extra = load_checkpoint(teacher_path)
    refiner = sam_refiner(cfg.label.sam)
    images, nonfinite = validation_evidence(
        model, int(extra.get("image_size", cfg.teacher.image_size)), refiner, grays, truths, ids, classes,
        CleaningConfig(**cfg.label.cleaning.model_dump()), batch_size=cfg.label.sam.batch_size)
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
        settings={"teacher_sha256": teacher_sha, "cleaning": cfg.label.cleaning.model_dump(),
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


def labelling_config(cfg: RunConfig, policy_path: str) -> LabelSection:
    """cfg.label with the gate of gate_policy.json: the calibrated per-class gates, except the
    classes the config's label.gate.per_class lists (the configured overrides win)."""
    policy = load_gate_policy(policy_path)
    gate = cfg.label.gate.with_calibrated({c: g.to_dict() for c, g in policy.calibrated.per_class.items()})
    effective = GateConfig.from_dict(gate.to_gate_dict())
    if effective != policy.gate:  # per_class overrides changed since the calibration: keep the file true
        policy.gate = effective
        policy.overridden = sorted(c for c in cfg.label.gate.per_class if c in policy.calibrated.per_class)
        save_gate_policy(policy_path, policy)
    return cfg.label.model_copy(update={"gate": gate})
