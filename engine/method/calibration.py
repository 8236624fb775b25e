"""Calibration of the per-class quality gate on labelled validation images, Ray-free.

    validation_evidence  teacher -> cleaning -> prompts -> SAM, exactly as the label job does it,
                         on labelled images: per image the cleaned U-Net masks, SAM's masks, SAM's
                         predicted IoU and the U-Net / SAM agreement, next to the ground truth
    calibrate_gate       per class, the ClassGate (policy and thresholds from small grids) whose
                         pseudo labels score best against the ground truth, plus a report
    GatePolicy           the calibrated gate as ``gate_policy.json`` (save_gate_policy /
                         load_gate_policy); `plabel run` writes it, `plabel label --gate-policy` reads it

Objective (per class c, over the validation images where the teacher found c; images where it did
not are 'empty' under every gate and left out):

    J_c(gate) = mean_i s_i,   s_i = Dice(pseudo label_i, truth_i)  if the gate keeps a mask (sam / unet)
                              s_i = v_ci                           if the gate drops the class
    v_ci = max(drop_floor, Dice(cleaned U-Net_i, truth_i) - drop_margin)      (break_even "image")
    v_ci = v_c = max(drop_floor, mean_i Dice(cleaned U-Net_i, truth_i) - drop_margin)   ("mean")

Why: a dropped class is ignored when the student trains (weight 0: neither foreground nor
background), so dropping is neutral, neither right nor wrong; a kept mask helps the student when
it is better than what the student would learn without it, and hurts when it is worse. Scoring a
dropped image at a break-even Dice v_c makes J_c = v_c + mean_i [kept_i] (Dice_i - v_c): every
kept mask earns its margin over break-even, every bad kept mask pays its shortfall, and dropping
earns nothing. The student also trains on the labelled images, so without a pseudo label it does
about as well as the teacher on that class: the break-even point is the teacher's own (cleaned)
Dice on these images, less ``drop_margin`` when slightly noisier extra data should still count
as a gain. With break_even "image" (default) the break-even is the teacher's Dice on that very
image, so a kept mask earns exactly its gain over the teacher's own prediction there: keeping
the teacher's mask earns nothing, and a gate cannot score by keeping the teacher's masks on the
easy images only. Measured on JSRT: with the uncalibrated gate, heart pseudo labels at Dice 0.81
under a 0.87 teacher lowered the student to 0.85 and lungs at 0.96 / 0.93 over 0.94 / 0.91 raised
it; at n = 20 an auto gate that kept the U-Net's right-clavicle masks where SAM agreed beat the
class mean on validation, and its student lost 3 Dice points on that class. ``drop_floor`` (0.5) bounds
it from below: a mask under Dice 0.5 overlaps the truth on less than a third of their union and is
not worth training on even when the teacher is that poor. Keeping the cleaned U-Net mask on every
image (policy unet) therefore scores v_c when the teacher is above the floor: it ties with drop,
and only a gate that keeps better masks than the teacher's, or drops the bad ones, beats both.

The tie between unet and drop goes to ``prefer_on_tie`` (default drop). A pseudo label no better
than the teacher's own prediction is not neutral: measured on JSRT (benchmarks/RESULTS.md,
n = 10), students trained on the cleaned teacher masks of heart and clavicles lost 2 to 4 Dice
points on those classes against the teacher, from scratch and warm-started alike, while a student
warm-started from the teacher that ignored those classes on the unlabelled images kept them.

Choice: every candidate gate is scored, and the SIMPLEST candidate within ``min_gain`` of the best
score wins: policies without thresholds first (drop then unet, or unet then drop with
prefer_on_tie unet), then sam, then auto; within a
policy, thresholds closest to the configured gate first, then lower ones. So a sam or auto gate
that drops every image loses to drop. With a handful of validation images this keeps the
configured gate or a simple policy unless a more elaborate one is clearly better. A class found on fewer than ``min_images``
validation images keeps its configured gate. A gain measured on the few images that a threshold
search picks out of the grid need not generalise (JSRT n = 10 seed 2: SAM kept for a clavicle on 3
of 10 images, +0.02 there, -7 Dice on the unlabelled images it was kept for; benchmarks/RESULTS.md):
with ``cross_validate`` (plabel's default) a chosen sam / auto gate must also win leave-one-out
(choose_gate); ``min_sam_share`` > 0 asks it to keep SAM on at least that share of the class's
present validation images (it did not fix that case). (The teacher checkpoint is selected on the same
validation images, so v_c is slightly optimistic: the calibration errs toward dropping.)
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from plabel.data import storage
from plabel.method.cleaning import CleaningConfig
from plabel.method.gate import ClassGate, GateConfig, gate_decision
from plabel.method.labelling import ImageMeta, clean_and_prompt, pseudo_label_rows, teacher_probs, teacher_view
from plabel.method.metrics import dice
from plabel.method.sam import SamModel, SamRefiner
from plabel.schemas.masks import decode_mask
from plabel.schemas.tables import class_column

POLICY_FILE = "gate_policy.json"
POLICY_FORMAT = "plabel-gate-policy"
POLICY_VERSION = 1
# candidate order of the tie-break: simpler policies first (prefer_on_tie "unet" swaps the first two)
POLICY_ORDER = ("drop", "unet", "sam", "auto")
TIE_CHOICES = ("drop", "unet")


# ------------------------------------------------------------------------------------------ inputs


@dataclass
class ValidationImage:
    """One labelled validation image as the label job sees it, C classes, size H x W.

    truth:     bool    (C, H, W) ground truth.
    unet:      bool    (C, H, W) cleaned U-Net masks (all False where the teacher found nothing).
    sam:       bool    (C, H, W) SAM's final-stage masks (all False where the class is absent or
               SAM's output was not finite).
    sam_iou:   float64 (C,) SAM's predicted IoU of the final stage; NaN where the class is absent,
               and NaN for a present class whose SAM output was not finite (NaN or inf).
    agreement: float64 (C,) Dice(unet, sam); NaN where sam_iou is NaN. (float64 as the label job
               gates with it: a float32 copy could fall on the other side of a threshold.)
    """

    id: str
    truth: np.ndarray
    unet: np.ndarray
    sam: np.ndarray
    sam_iou: np.ndarray
    agreement: np.ndarray

    def __post_init__(self):
        self.truth, self.unet, self.sam = (np.asarray(m, dtype=bool) for m in (self.truth, self.unet, self.sam))
        self.sam_iou = np.asarray(self.sam_iou, dtype=np.float64).reshape(-1)
        self.agreement = np.asarray(self.agreement, dtype=np.float64).reshape(-1)
        C = self.truth.shape[0]
        if self.truth.ndim != 3 or self.unet.shape != self.truth.shape or self.sam.shape != self.truth.shape:
            raise ValueError(f"{self.id}: truth, unet and sam masks must share one (C, H, W) shape, got "
                             f"{self.truth.shape}, {self.unet.shape}, {self.sam.shape}")
        if self.sam_iou.shape != (C,) or self.agreement.shape != (C,):
            raise ValueError(f"{self.id}: sam_iou and agreement must have shape ({C},), got "
                             f"{self.sam_iou.shape} and {self.agreement.shape}")

    @property
    def present(self) -> np.ndarray:
        """bool (C,): the teacher found the class (non-empty cleaned mask)."""
        return self.unet.reshape(len(self.unet), -1).any(axis=1)


def agreement_dice(unet: np.ndarray, sam: np.ndarray) -> np.ndarray:
    """float64 (C,) Dice between cleaned U-Net masks and SAM's masks, bool (C, H, W) each; NaN where
    the U-Net mask is empty (the label job's ``agreement_dice``)."""
    return np.array([dice(u, s) if u.any() else np.nan for u, s in zip(unet, sam)], dtype=np.float64)


def validation_evidence(
    teacher,
    image_size: int,
    refiner,
    grays: Sequence[np.ndarray],
    truths: Sequence[np.ndarray],
    ids: Sequence[str],
    classes: Sequence[str],
    cleaning=None,
    batch_size: int = 8,
) -> tuple[list[ValidationImage], list[str]]:
    """The calibration inputs of labelled images, computed with the label job's own functions.

    teacher: U-Net (plabel.method.unet.UNet, eval mode); image_size: its input side.
    refiner: plabel.method.sam.SamRefiner, or a SamModel (refined with its default stages).
    grays: uint8 (H, W) per image; truths: bool (C, H, W) per image; ids: one name per image.
    cleaning: plabel.method.cleaning.CleaningConfig (default CleaningConfig()).

    Per batch of ``batch_size`` images: plabel.method.labelling.teacher_probs -> clean_and_prompt ->
    pseudo_label_rows with a probe gate that keeps SAM's mask wherever SAM answered (policy sam,
    thresholds -inf), so SAM's masks, predicted IoU and agreement are exactly the label job's.
    Returns (images, skipped): images whose teacher probabilities were not finite are left out
    and named in ``skipped`` (the label job makes them error rows).
    """

    if len(grays) != len(truths) or len(grays) != len(ids):
        raise ValueError(f"{len(grays)} images, {len(truths)} ground truths and {len(ids)} ids")
    if isinstance(refiner, SamModel):
        refiner = SamRefiner(refiner)
    cleaning = CleaningConfig() if cleaning is None else cleaning
    C = len(classes)
    probe_gate = ClassGate(policy="sam", min_sam_iou=-math.inf, min_agreement=-math.inf)
    probe = GateConfig(default=probe_gate)
    out: list[ValidationImage] = []
    skipped: list[str] = []
    for start in range(0, len(grays), batch_size):
        b_grays = teacher_view(teacher, [np.asarray(g, dtype=np.uint8) for g in grays[start:start + batch_size]])
        b_truths = [np.asarray(t, dtype=bool) for t in truths[start:start + batch_size]]
        b_ids = [str(i) for i in ids[start:start + batch_size]]
        for name, g, t in zip(b_ids, b_grays, b_truths):
            if t.shape != (C, *g.shape):
                raise ValueError(f"{name}: ground truth of shape {t.shape} does not fit {C} classes and "
                                 f"image {g.shape}")
        probs = teacher_probs(teacher, b_grays, image_size, names=b_ids, nonfinite="none")
        keep = [k for k, p in enumerate(probs) if p is not None]
        skipped += [b_ids[k] for k in range(len(probs)) if probs[k] is None]
        if not keep:
            continue
        prepared = [clean_and_prompt(probs[k], cleaning) for k in keep]
        metas = [ImageMeta(b_ids[k], None, None, *b_grays[k].shape) for k in keep]
        rows = pseudo_label_rows(refiner, [b_grays[k] for k in keep], [p[0] for p in prepared],
                                 [p[1] for p in prepared], [p[2] for p in prepared], metas, list(classes),
                                 probe, {})
        for k, (cleaned, _, _), row in zip(keep, prepared, rows):
            H, W = b_grays[k].shape
            sam = np.zeros((C, H, W), dtype=bool)
            sam_iou = np.full(C, np.nan, dtype=np.float64)
            agreement = np.full(C, np.nan, dtype=np.float64)
            for ci, c in enumerate(classes):
                if row[class_column(c, "kept")] == "sam":  # present and SAM's output finite
                    sam[ci] = decode_mask(row[class_column(c, "mask")], H, W)
                    sam_iou[ci] = row[class_column(c, "sam_iou")]
                    agreement[ci] = row[class_column(c, "agreement_dice")]
            out.append(ValidationImage(b_ids[k], b_truths[k], cleaned, sam, sam_iou, agreement))
    return out, skipped


# ------------------------------------------------------------------------------------- calibration


@dataclass
class CalibrationObjective:
    """The objective's settings (see the module docstring).

    drop_floor:  lowest break-even Dice v_c a dropped image scores.
    drop_margin: v_c = max(drop_floor, teacher's mean cleaned Dice - drop_margin).
    min_gain:    a candidate within min_gain of the best score counts as a tie (simplest wins).
    min_images:  a class found by the teacher on fewer validation images keeps its configured gate.
    min_sam_share: least share of the present validation images a sam / auto gate must keep SAM's
                 mask on to be a candidate (0 = no such rule).
    cross_validate: keep a sam / auto gate only if the whole choice, repeated leaving each
                 validation image out and scored on that image, beats the same choice among drop
                 and unet alone by min_gain; else the best of drop and unet (see choose_gate).
    prefer_on_tie: "drop" or "unet", the simpler of the two when they tie (see the module docstring).
    break_even:  "image" (default): a dropped image scores max(drop_floor, its own cleaned U-Net
                 Dice - drop_margin); "mean": every dropped image of the class scores v_c.
    """

    drop_floor: float = 0.5
    drop_margin: float = 0.0
    min_gain: float = 0.005
    min_images: int = 3
    prefer_on_tie: str = "drop"
    break_even: str = "image"
    min_sam_share: float = 0.0
    cross_validate: bool = False  # plabel's config turns it on (label.gate.cross_validate)

    def __post_init__(self):
        if not (0.0 <= self.min_sam_share <= 1.0):
            raise ValueError(f"min_sam_share {self.min_sam_share!r} is not a number in [0, 1]")
        if self.prefer_on_tie not in TIE_CHOICES:
            raise ValueError(f"prefer_on_tie {self.prefer_on_tie!r} is not one of {TIE_CHOICES}")
        if self.break_even not in ("image", "mean"):
            raise ValueError(f"break_even {self.break_even!r} is not one of ('image', 'mean')")

    @classmethod
    def from_gate_section(cls, section, **overrides) -> "CalibrationObjective":
        """The objective of a plabel.schemas.config.GateSection (label.gate); ``overrides`` not None win."""
        keys = ("drop_floor", "drop_margin", "min_images", "prefer_on_tie", "break_even", "min_sam_share",
                "cross_validate")
        values = {k: getattr(section, k) for k in keys}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @property
    def policy_order(self) -> tuple[str, ...]:
        """Candidate policies, simplest first."""
        first, second, *rest = POLICY_ORDER
        return POLICY_ORDER if self.prefer_on_tie == first else (second, first, *rest)

    def to_dict(self) -> dict:
        return {"drop_floor": self.drop_floor, "drop_margin": self.drop_margin, "min_gain": self.min_gain,
                "min_images": self.min_images, "prefer_on_tie": self.prefer_on_tie, "break_even": self.break_even,
                # written only when set, so policies and benchmark cache keys from before it stay the same
                **({"min_sam_share": self.min_sam_share} if self.min_sam_share else {}),
                **({"cross_validate": True} if self.cross_validate else {})}


@dataclass
class GateGrid:
    """Candidate thresholds; the configured gate's own values are always added."""

    min_sam_iou: tuple[float, ...] = (0.0, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9)
    min_agreement: tuple[float, ...] = (0.0, 0.5, 0.6, 0.7, 0.8, 0.9)
    min_agreement_unet: tuple[float, ...] = (0.0, 0.3, 0.5, 0.7)

    def to_dict(self) -> dict:
        return {k: list(getattr(self, k)) for k in ("min_sam_iou", "min_agreement", "min_agreement_unet")}


def candidate_gates(base: ClassGate, grid: GateGrid = GateGrid(),
                    order: Sequence[str] = POLICY_ORDER) -> list[ClassGate]:
    """Every candidate gate, simplest first (order): drop, unet, sam (min_sam_iou x
    min_agreement), auto (x min_agreement_unet). Within a policy: closest to ``base``'s thresholds first (sum of
    absolute differences of the thresholds the policy uses), then lower thresholds. unet and drop
    carry ``base``'s (unused) thresholds."""
    def values(grid_values, own):
        return sorted({float(v) for v in grid_values} | {float(own)})

    ious = values(grid.min_sam_iou, base.min_sam_iou)
    agrees = values(grid.min_agreement, base.min_agreement)
    agrees_unet = values(grid.min_agreement_unet, base.min_agreement_unet)
    thresholds = dict(min_sam_iou=base.min_sam_iou, min_agreement=base.min_agreement,
                      min_agreement_unet=base.min_agreement_unet)
    sam = sorted(((i, a) for i in ious for a in agrees),
                 key=lambda t: (abs(t[0] - base.min_sam_iou) + abs(t[1] - base.min_agreement), t))
    auto = sorted(((i, a, u) for i in ious for a in agrees for u in agrees_unet),
                  key=lambda t: (abs(t[0] - base.min_sam_iou) + abs(t[1] - base.min_agreement)
                                 + abs(t[2] - base.min_agreement_unet), t))
    by_policy = {
        "unet": [ClassGate("unet", **thresholds)],
        "drop": [ClassGate("drop", **thresholds)],
        "sam": [ClassGate("sam", i, a, base.min_agreement_unet) for i, a in sam],
        "auto": [ClassGate("auto", i, a, u) for i, a, u in auto],
    }
    return [g for policy in order for g in by_policy[policy]]


@dataclass
class _ClassEvidence:
    """One class over N validation images: float64 / bool arrays of shape (N,)."""

    present: np.ndarray
    dice_unet: np.ndarray  # Dice(cleaned U-Net, truth); the empty mask where absent
    dice_sam: np.ndarray  # Dice(SAM, truth); the empty mask where absent or not finite
    sam_iou: np.ndarray
    agreement: np.ndarray


def _class_evidence(images: Sequence[ValidationImage], ci: int) -> _ClassEvidence:
    return _ClassEvidence(
        present=np.array([im.present[ci] for im in images], dtype=bool),
        dice_unet=np.array([dice(im.unet[ci], im.truth[ci]) for im in images], dtype=np.float64),
        dice_sam=np.array([dice(im.sam[ci], im.truth[ci]) for im in images], dtype=np.float64),
        sam_iou=np.array([im.sam_iou[ci] for im in images], dtype=np.float64),
        agreement=np.array([im.agreement[ci] for im in images], dtype=np.float64),
    )


def _decisions(gate: ClassGate, ev: _ClassEvidence) -> list[str]:
    """The label job's decision per image (plabel.method.gate.gate_decision): a present class with a
    NaN sam_iou had a non-finite SAM output."""
    return [gate_decision(gate, bool(p), float(q), float(a), sam="ran" if math.isfinite(q) else "nonfinite")
            for p, q, a in zip(ev.present, ev.sam_iou, ev.agreement)]


def _image_scores(decisions: Sequence[str], ev: _ClassEvidence, drop_value) -> np.ndarray:
    """float64 (N,) each image's score under ``decisions``: SAM's or the cleaned U-Net's Dice where
    kept, the break-even where dropped, NaN where the class is absent ('empty').
    drop_value: the break-even score of a dropped image, one float or float64 (N,) per image."""
    v = np.broadcast_to(np.asarray(drop_value, dtype=np.float64), (len(decisions),))
    return np.array([np.nan if d == "empty" else ev.dice_sam[i] if d == "sam" else ev.dice_unet[i] if d == "unet"
                     else v[i] for i, d in enumerate(decisions)], dtype=np.float64)


def _objective(decisions: Sequence[str], ev: _ClassEvidence, drop_value) -> float:
    """J of the module docstring: mean over present images (NaN when there are none)."""
    scores = _image_scores(decisions, ev, drop_value)
    return float(np.nanmean(scores)) if np.isfinite(scores).any() else float("nan")


def drop_value(ev_dice_unet: np.ndarray, present: np.ndarray, objective: CalibrationObjective) -> float:
    """v_c: max(drop_floor, mean cleaned U-Net Dice over present images - drop_margin)."""
    if not np.any(present):
        return float(objective.drop_floor)
    return float(max(objective.drop_floor, float(np.mean(ev_dice_unet[present])) - objective.drop_margin))


def break_even(ev_dice_unet: np.ndarray, present: np.ndarray, objective: CalibrationObjective):
    """The score of a dropped image: float64 (N,) max(drop_floor, that image's cleaned U-Net Dice -
    drop_margin) with break_even "image", else the class's one v_c (drop_value)."""
    if objective.break_even == "mean":
        return drop_value(ev_dice_unet, present, objective)
    return np.maximum(objective.drop_floor, np.asarray(ev_dice_unet, dtype=np.float64) - objective.drop_margin)


def _pick(score: np.ndarray, sam: np.ndarray, allowed: np.ndarray, cols: np.ndarray,
          objective: CalibrationObjective) -> int:
    """Index of the simplest allowed candidate within min_gain of the best mean score over the
    images ``cols`` (bool (N,), at least one; the class is present on all of them). score: float64
    (K, N); sam: bool (K, N), where a candidate keeps SAM's mask. A candidate that keeps SAM on some
    but less than min_sam_share of the images is out."""
    j = np.where(allowed, score[:, cols].mean(axis=1), -np.inf)
    share = sam[:, cols].mean(axis=1)
    j[(share > 0) & (share < objective.min_sam_share - 1e-12)] = -np.inf
    return int(np.flatnonzero(j >= np.max(j) - objective.min_gain - 1e-12)[0])


def choose_gate(candidates: Sequence[ClassGate], ev: _ClassEvidence, drop_value,
                objective: CalibrationObjective) -> tuple[ClassGate, dict]:
    """The calibrated gate of one class and a dict (empty, or the cross-validation's numbers).

    The simplest candidate within min_gain of the best objective (min_sam_share applied). With
    cross_validate, a chosen sam / auto gate must also survive leave-one-out: for each present
    image i the choice is repeated on the other images, once among all candidates and once among
    drop / unet only, and each choice is scored on image i; unless the first mean beats the second
    by min_gain, the best of drop / unet is kept instead."""
    decisions = [_decisions(g, ev) for g in candidates]
    score = np.stack([_image_scores(d, ev, drop_value) for d in decisions])  # (K, N)
    sam = np.array([[x == "sam" for x in d] for d in decisions], dtype=bool)  # (K, N)
    everything = np.ones(len(candidates), bool)
    simple = np.array([g.policy in ("drop", "unet") for g in candidates])
    present = np.asarray(ev.present, bool)
    k = _pick(score, sam, everything, present, objective)
    if not (objective.cross_validate and candidates[k].policy in ("sam", "auto") and present.sum() >= 2):
        return candidates[k], {}
    held_search, held_simple = [], []
    for i in np.flatnonzero(present):
        rest = present.copy()
        rest[i] = False
        held_search.append(score[_pick(score, sam, everything, rest, objective), i])
        held_simple.append(score[_pick(score, sam, simple, rest, objective), i])
    cv = {"search": float(np.mean(held_search)), "simple": float(np.mean(held_simple))}
    if cv["search"] >= cv["simple"] + objective.min_gain - 1e-12:
        return candidates[k], cv
    cv["reason"] = (f"{candidates[k].policy} gate not kept: left-one-out score {cv['search']:.3f} vs "
                    f"{cv['simple']:.3f} for drop / unet alone")
    return candidates[_pick(score, sam, simple, present, objective)], cv


def _report(gate: ClassGate, ev: _ClassEvidence, v, objective_base: float, calibrated: bool,
            reason: str | None) -> dict:
    decisions = _decisions(gate, ev)
    kept = [ev.dice_sam[i] if d == "sam" else ev.dice_unet[i] for i, d in enumerate(decisions) if d != "dropped"]
    n = len(decisions)
    return {
        "gate": gate.to_dict(),
        "calibrated": calibrated,
        "reason": reason,
        "n_images": n,
        "n_present": int(ev.present.sum()),
        "dice_unet": float(ev.dice_unet.mean()) if n else None,
        "dice_sam": float(ev.dice_sam.mean()) if n else None,
        "dice_gated": float(np.mean(kept)) if kept else None,
        "kept": {k: decisions.count(k) for k in ("sam", "unet", "dropped", "empty")},
        "decisions": decisions,
        # the break-even of a dropped image (break_even "image": its mean over the present images)
        "drop_value": float(v) if np.ndim(v) == 0 else (float(np.mean(v[ev.present])) if ev.present.any() else None),
        "objective": _none_if_nan(_objective(decisions, ev, v)),
        "objective_base": _none_if_nan(objective_base),
    }


def _none_if_nan(x: float) -> float | None:
    return None if not math.isfinite(x) else float(x)


@dataclass
class Calibration:
    """gate: the configured default plus one calibrated ClassGate per class.
    report: per class {gate, calibrated, reason, n_images, n_present, dice_unet, dice_sam,
    dice_gated, kept: {sam, unet, dropped, empty}, decisions (one per image of ``ids``),
    drop_value, objective, objective_base}:
    dice_unet / dice_sam are means over all validation images (an absent class scores its empty
    mask: 1 when the truth is empty too, else 0); dice_gated is the mean Dice of the pseudo labels
    the chosen gate keeps (dropped images left out; None when it drops all); objective /
    objective_base are J of the chosen / configured gate. ids: the validation images used."""

    gate: GateConfig
    report: dict[str, dict]
    ids: list[str]
    objective: CalibrationObjective = field(default_factory=CalibrationObjective)


def calibrate_gate(
    images: Sequence[ValidationImage],
    classes: Sequence[str],
    base: GateConfig | None = None,
    objective: CalibrationObjective = CalibrationObjective(),
    grid: GateGrid = GateGrid(),
) -> Calibration:
    """Choose each class's ClassGate from the candidates of :func:`candidate_gates` by the
    objective of the module docstring. ``base``: the configured gate (default GateConfig()),
    the reference of the tie-break and what a class with too little evidence keeps."""
    base = GateConfig() if base is None else base
    images = list(images)
    for im in images:
        if im.truth.shape[0] != len(classes):
            raise ValueError(f"{im.id}: {im.truth.shape[0]} classes in the masks, expected {len(classes)}")
    per_class: dict[str, ClassGate] = {}
    report: dict[str, dict] = {}
    for ci, c in enumerate(classes):
        own = base.for_class(c)
        ev = _class_evidence(images, ci)
        v = break_even(ev.dice_unet, ev.present, objective)
        j_base = _objective(_decisions(own, ev), ev, v)
        n_present = int(ev.present.sum())
        if n_present < objective.min_images:
            per_class[c] = own
            report[c] = _report(own, ev, v, j_base, False,
                                f"found on {n_present} validation image(s), fewer than {objective.min_images}: "
                                "kept the configured gate")
            continue
        candidates = candidate_gates(own, grid, objective.policy_order)
        chosen, cv = choose_gate(candidates, ev, v, objective)
        per_class[c] = chosen
        report[c] = _report(chosen, ev, v, j_base, True, cv.pop("reason", None))
        if cv:
            report[c]["cross_validation"] = cv
    gate = GateConfig(default=base.default, per_class=per_class)
    return Calibration(gate=gate, report=report, ids=[im.id for im in images], objective=objective)


def format_calibration(report: dict[str, dict]) -> str:
    """Plain-text table of a calibration report: one row per class."""
    def num(v, fmt="{:.3f}"):
        return "-" if v is None else fmt.format(v)

    header = ["class", "gate", "kept sam/unet/dropped/empty", "dice unet", "dice sam", "dice gated",
              "objective", "(configured)"]
    body = []
    for c, r in report.items():
        g = r["gate"]
        if g["policy"] in ("unet", "drop"):
            gate = g["policy"]
        else:
            gate = f"{g['policy']} iou>={g['min_sam_iou']:g} agr>={g['min_agreement']:g}"
            if g["policy"] == "auto":
                gate += f" unet agr>={g['min_agreement_unet']:g}"
        if not r["calibrated"]:
            gate += " (configured)"
        k = r["kept"]
        body.append([c, gate, f"{k['sam']}/{k['unet']}/{k['dropped']}/{k['empty']}", num(r["dice_unet"]),
                     num(r["dice_sam"]), num(r["dice_gated"]), num(r["objective"]), num(r["objective_base"])])
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- policy file


@dataclass
class GatePolicy:
    """The content of ``gate_policy.json``.

    gate:       the gate the label job uses: calibrated per class, except the classes of
                ``overridden``, whose gate the config's ``label.gate.per_class`` sets.
    calibrated: the calibration's own choice (before those overrides).
    report:     Calibration.report.
    validation: {"split", "n_images", "ids", "skipped"}: the labelled images used.
    settings:   what the calibration depended on (teacher SHA-256, SAM, cleaning, objective, grid).
    overridden: classes whose configured per-class gate won over the calibrated one.
    """

    gate: GateConfig
    calibrated: GateConfig
    report: dict[str, dict] = field(default_factory=dict)
    validation: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    overridden: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"format": POLICY_FORMAT, "version": POLICY_VERSION, "gate": self.gate.to_dict(),
                "calibrated": self.calibrated.to_dict(), "overridden": list(self.overridden),
                "report": self.report, "validation": self.validation, "settings": self.settings}

    @classmethod
    def from_dict(cls, d: dict, where: str = "gate policy") -> "GatePolicy":
        """Parse and check a policy dict; ValueError naming ``where`` and the bad part."""
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(d).__name__}")
        if d.get("format") != POLICY_FORMAT or d.get("version") != POLICY_VERSION:
            raise ValueError(f"{where}: format {d.get('format')!r} version {d.get('version')!r}, expected "
                             f"{POLICY_FORMAT!r} version {POLICY_VERSION}")
        gates = {}
        for key in ("gate", "calibrated"):
            try:
                gates[key] = GateConfig.from_dict(d.get(key))
            except (TypeError, ValueError, AttributeError) as e:
                raise ValueError(f"{where}: bad {key!r}: {e}") from None
        return cls(gate=gates["gate"], calibrated=gates["calibrated"], report=d.get("report") or {},
                   validation=d.get("validation") or {}, settings=d.get("settings") or {},
                   overridden=list(d.get("overridden") or []))


def save_gate_policy(location, policy: GatePolicy) -> None:
    """Write the policy as JSON to a local path or a URI (atomic: plabel.data.storage.write_text)."""
    storage.write_text(str(location), json.dumps(policy.to_dict(), indent=2, sort_keys=True))


def load_gate_policy(location) -> GatePolicy:
    """Read a ``gate_policy.json`` (local path or URI); ValueError naming the file when it is not
    JSON or not a plabel gate policy, FileNotFoundError when it is missing."""
    name = storage.redact(str(location))
    try:
        d = json.loads(storage.read_text(str(location)))
    except json.JSONDecodeError as e:
        raise ValueError(f"{name}: not valid JSON: {e}") from None
    return GatePolicy.from_dict(d, name)
