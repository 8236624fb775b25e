"""Pseudo-labelling of a batch of images (steps 2-4 of the method), Ray-free.

    teacher_view       the gray images as the teacher reads them (its intensity): SAM is given these
    teacher_probs      U-Net sigmoid probabilities, back on each image's own grid
    clean_and_prompt   cleaned class masks, U-Net confidence inside them, SAM prompts
    pseudo_label_rows  SAM refinement (all classes of an image per decoder call), quality gate,
                       one pseudo-label table row per image
    pseudo_label_targets  table rows -> the student's training masks and class weights

plabel.jobs.label_job runs the first two on CPU actors and the last on SAM actors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from plabel.method.cleaning import CleaningConfig, clean_masks
from plabel.method.gate import GateConfig, gate_decision
from plabel.method.metrics import dice
from plabel.method.prediction import mask_confidence
from plabel.method.preprocess import masks_to_grid, normalise_intensity, probs_to_image, to_unet_input
from plabel.method.prompts import RefinementPrompts, extract_prompts
from plabel.method.unet import predict_probs
from plabel.schemas.masks import encode_mask
from plabel.schemas.tables import CLASS_FIELD_TYPES, class_column, decode_class_masks


@dataclass
class ImageMeta:
    """Where a row comes from: id, shard path, key in the shard, original size; ``note``: a
    warning about an image that is still labelled (goes to the row's message);
    ``sop_instance_uid``: a DICOM source's SOPInstanceUID."""

    id: str
    shard: str | None
    key: str | None
    height: int
    width: int
    note: str | None = None
    sop_instance_uid: str | None = None


NONFINITE_TEACHER = "teacher produced non-finite probabilities (NaN or inf)"


def teacher_view(model: torch.nn.Module, grays: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Gray uint8 (H, W) images -> uint8 (H, W), normalised as ``model`` (a plabel U-Net) reads them
    (its ``config.intensity``, plabel.method.preprocess.normalise_intensity). The label and calibrate
    jobs give SAM these images, so that SAM refines the image the teacher segmented."""
    return [normalise_intensity(g, model.config.intensity) for g in grays]


def teacher_probs(model: torch.nn.Module, grays: Sequence[np.ndarray], image_size: int,
                  names: Sequence[str] | None = None, nonfinite: str = "raise") -> list[np.ndarray | None]:
    """U-Net probabilities of gray uint8 (H, W) images -> float32 (C, H, W) per image. The images are
    normalised as the model was trained (its ``config.intensity``; plabel.method.preprocess.to_unet_input).

    An image whose probabilities hold NaN or inf: ``nonfinite="raise"`` raises ValueError naming it
    (``names[i]``, else its index), ``nonfinite="none"`` gives None in its place (the label job
    turns it into an error row; the other images of the batch are unaffected).
    """

    if nonfinite not in ("raise", "none"):
        raise ValueError(f"nonfinite must be 'raise' or 'none', got {nonfinite!r}")
    if not grays:
        return []
    x = np.stack([to_unet_input(g, image_size, model.config.intensity) for g in grays])
    probs = predict_probs(model, x)
    out: list[np.ndarray | None] = []
    for i, (g, p) in enumerate(zip(grays, probs)):
        if not np.isfinite(p).all():
            if nonfinite == "none":
                out.append(None)
                continue
            name = names[i] if names is not None else f"image {i} of the batch"
            raise ValueError(f"{name}: {NONFINITE_TEACHER}")
        out.append(probs_to_image(p, *g.shape))
    return out


def clean_and_prompt(probs: np.ndarray, cfg: CleaningConfig) -> tuple[np.ndarray, np.ndarray, RefinementPrompts]:
    """float32 (C, H, W) -> cleaned bool (C, H, W), mean probability inside each cleaned mask
    float32 (C,) (NaN where the class is absent), and the SAM prompts."""
    cleaned = clean_masks(probs, cfg)
    return cleaned, mask_confidence(probs, cleaned), extract_prompts(cleaned)


def empty_row(meta: ImageMeta, classes: Sequence[str], status: str, message: str | None, provenance: dict) -> dict:
    """A table row with image-level fields only (status 'error' or per-class fields filled later)."""
    row = {
        "id": meta.id,
        "shard": meta.shard,
        "key": meta.key,
        "height": meta.height,
        "width": meta.width,
        "sop_instance_uid": meta.sop_instance_uid,
        "status": status,
        "message": message,
        **provenance,
    }
    for c in classes:
        for f in CLASS_FIELD_TYPES:
            row[class_column(c, f)] = None
    return row


def class_fields(
    kept: str, unet_mask: np.ndarray, sam_mask: np.ndarray | None, box, points, labels,
    unet_prob: float, sam_iou: float, agreement: float,
) -> dict:
    """The per-class fields of one row (without the class prefix)."""
    final = sam_mask if kept == "sam" else (unet_mask if kept == "unet" else np.zeros_like(unet_mask))
    present = kept != "empty"
    keep_pts = labels >= 0
    return {
        "mask": encode_mask(final),
        "box": [float(v) for v in box] if present else None,
        "points": [[float(x), float(y)] for x, y in points[keep_pts]] if present else None,
        "point_labels": [int(v) for v in labels[keep_pts]] if present else None,
        "area": int(final.sum()),
        "unet_prob": None if not np.isfinite(unet_prob) else float(unet_prob),
        "sam_iou": None if not np.isfinite(sam_iou) else float(sam_iou),
        "agreement_dice": None if not np.isfinite(agreement) else float(agreement),
        "kept": kept,
    }


def pseudo_label_rows(
    refiner,
    grays: Sequence[np.ndarray],
    cleaned: Sequence[np.ndarray],
    unet_prob: Sequence[np.ndarray],
    prompts: Sequence[RefinementPrompts],
    metas: Sequence[ImageMeta],
    classes: Sequence[str],
    gate: GateConfig,
    provenance: dict,
) -> list[dict]:
    """Refine with SAM (one batched call per stage), gate each class, build the table rows.

    grays: uint8 (H, W) per image, as the teacher reads them (:func:`teacher_view`: SAM refines the
    image the teacher segmented); cleaned: bool (C, H, W); unet_prob: float32 (C,).
    refiner: plabel.method.sam.SamRefiner, or None: no SAM. Then a gate that consults SAM for no
    class (GateConfig.consults_sam) applies its drop / unet policies; otherwise the cleaned U-Net
    masks are kept.

    A class whose SAM output (IoU of any stage, final logits) is NaN or inf is not gated: it keeps
    the cleaned U-Net mask (policies auto / unet) or is dropped (sam / drop), its ``sam_iou`` and
    ``agreement_dice`` are null, and the row's ``message`` says so (the row stays ok). ``meta.note``
    also goes to the message.
    """
    rgbs = [np.repeat(g[:, :, None], 3, axis=2) for g in grays]
    results = refiner.refine_batch(rgbs, list(prompts)) if refiner is not None and rgbs else [None] * len(rgbs)
    no_sam = "off" if gate.consults_sam(classes) else "unneeded"
    rows = []
    for meta, m, up, pr, res in zip(metas, cleaned, unet_prob, prompts, results):
        any_present = bool(pr.valid.any())
        notes = [meta.note] if isinstance(meta.note, str) and meta.note else []
        row = empty_row(meta, classes, "ok" if any_present else "empty", None, provenance)
        for ci, c in enumerate(classes):
            present = bool(pr.valid[ci])
            sam_mask = res.masks[ci] if (res is not None and present) else None
            sam_iou = float(res.iou_pred[ci]) if (res is not None and present) else float("nan")
            if sam_mask is not None and not sam_output_finite(res, ci):
                kept = gate_decision(gate.for_class(c), present, sam_iou, float("nan"), sam="nonfinite")
                notes.append(f"class {c}: SAM produced non-finite logits or IoU; "
                             + ("kept the cleaned U-Net mask" if kept == "unet" else "class dropped"))
                sam_mask, sam_iou, agreement = None, float("nan"), float("nan")
            else:
                agreement = dice(m[ci], sam_mask) if sam_mask is not None else float("nan")
                kept = gate_decision(gate.for_class(c), present, sam_iou, agreement,
                                     sam=no_sam if res is None else "ran")
            fields = class_fields(kept, m[ci], sam_mask, pr.boxes[ci], pr.points[ci], pr.point_labels[ci],
                                  float(up[ci]), sam_iou, agreement)
            for f, v in fields.items():
                row[class_column(c, f)] = v
        row["message"] = "; ".join(notes) if notes else None
        rows.append(row)
    return rows


def sam_output_finite(result, ci: int) -> bool:
    """True when SAM's IoU predictions (every stage) and final low-res logits for class ``ci`` of a
    RefinementResult are all finite."""
    if not all(np.isfinite(np.asarray(s)[ci]) for s in result.stage_iou):
        return False
    if not np.isfinite(np.asarray(result.iou_pred)[ci]):
        return False
    logits = getattr(result, "low_res_logits", None)
    return logits is None or bool(np.isfinite(np.asarray(logits)[ci]).all())



def pseudo_label_targets(rows: Sequence, classes: Sequence[str], image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """What a student trains on from pseudo-label table rows (mappings with at least ``status``,
    ``height``, ``width`` and ``<class>.mask`` / ``<class>.kept`` for every class).

    Returns masks uint8 (N, C, S, S) in {0, 1}: each row's kept masks
    (plabel.schemas.tables.decode_class_masks) resized to the U-Net grid S = ``image_size``
    (plabel.method.preprocess.masks_to_grid), and weight float32 (N, C): 0 for a class the quality
    gate dropped and for every class of an error row, 1 otherwise. N = 0 gives empty arrays.
    """
    n, C = len(rows), len(classes)
    masks = np.zeros((n, C, image_size, image_size), np.uint8)
    weight = np.zeros((n, C), np.float32)
    for i, row in enumerate(rows):
        m, weight[i] = decode_class_masks(row, classes)
        if m.shape[1] > 0:
            masks[i] = masks_to_grid(m, image_size)
    return masks, weight
