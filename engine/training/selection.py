"""Model selection: which epoch's weights a U-Net training run keeps, judged on the labelled
validation images.

Two rules:
    mean     the epoch with the highest mean validation Dice (over images and classes); the
             first one wins ties. Teachers and students trained from scratch use it.
    guarded  for a student warm-started from its teacher: the starting weights (the teacher) are a
             candidate, measured before the first epoch, and an epoch is a candidate only if no
             class's mean validation Dice is more than ``tolerance`` below the starting weights'.
             The best mean among the candidates wins, so a student never keeps weights that lost
             a class on the validation images; if every epoch lost one, it keeps the teacher's.

A weight average of students (student.soup) is held to the guarded rule too: :func:`lost_classes`
against the teacher's validation Dice; plabel run keeps the best member instead of an average
that lost a class.

Per-class Dice here is the mean over the validation images of plabel.method.metrics.dice_per_class (an
image where truth and prediction are both empty scores 1).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RULES = ("mean", "guarded")


# half a Dice point: the quality benchmark's criterion (no class more than 0.5 points below the
# teacher); plabel.schemas.config.TrainSection.selection_tolerance and `plabel train` default to it
GUARD_TOLERANCE = 0.005


def lost_classes(per_class, reference, tolerance: float = GUARD_TOLERANCE) -> list[int]:
    """Indices of the classes whose Dice ``per_class`` (C,) is more than ``tolerance`` below
    ``reference`` (C,), or is not finite; [] when no class was lost."""
    d, ref = np.asarray(per_class, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if d.ndim != 1 or d.shape != ref.shape:
        raise ValueError(f"per-class validation Dice has shape {d.shape}, the reference {ref.shape}")
    return [int(i) for i in np.flatnonzero(~np.isfinite(d) | (d < ref - tolerance - 1e-12))]


def guard_average(average_per_class, reference, member_val_dice, tolerance: float = GUARD_TOLERANCE
                  ) -> tuple[list[int], int | None]:
    """The guarded rule for a weight average of students (student.soup).

    average_per_class / reference: per-class validation Dice (C,) of the average and the teacher;
    member_val_dice: each member's best validation Dice (None counts lowest). Returns (lost classes,
    None) to keep the average, or, when it lost a class (:func:`lost_classes`), (lost classes, index
    of the member with the best validation Dice, the first of ties) to keep instead."""
    lost = lost_classes(average_per_class, reference, tolerance)
    if not lost:
        return lost, None
    return lost, int(np.argmax([-1.0 if v is None else float(v) for v in member_val_dice]))


def guard_note(reference, epochs: list[tuple[int, list[float] | None]], classes: list[str],
               tolerance: float = GUARD_TOLERANCE) -> dict | None:
    """Why the guarded rule kept the starting weights. Either no epoch kept every class: the refused
    epoch with the best mean validation Dice and the classes it lost, each with how far (Dice, 0-1) it
    fell below the starting weights; or the epochs that kept every class all scored a lower mean than
    the starting weights: the best of those, ``lost`` empty.

    reference: the starting weights' per-class validation Dice (C,); epochs: (epoch, per-class Dice
    (C,) or None) of the epochs run. Returns {"epoch" (1-based), "mean_val_dice", "start_mean_val_dice",
    "lost": {class: drop}} or None when no epoch has validation Dice."""
    ref = np.asarray(reference, dtype=np.float64)
    scored = [(e, np.asarray(d, dtype=np.float64)) for e, d in epochs if d is not None and np.size(d)]
    if not scored:
        return None
    kept_all = [ed for ed in scored if not lost_classes(ed[1], ref, tolerance)]
    epoch, best = max(kept_all or scored,
                      key=lambda ed: float(np.nanmean(ed[1])) if np.isfinite(ed[1]).any() else -1.0)
    return {"epoch": int(epoch) + 1, "mean_val_dice": round(float(np.mean(best)), 4),
            "start_mean_val_dice": round(float(ref.mean()), 4),
            "lost": {classes[i]: round(float(ref[i] - best[i]), 4) for i in lost_classes(best, ref, tolerance)}}


def describe_guard(note: dict, start: str = "the teacher") -> str:
    """One line for a person: what :func:`guard_note` found."""
    means = f"mean Dice {note['mean_val_dice']:.4f} vs {note['start_mean_val_dice']:.4f}"
    if not note["lost"]:
        return (f"kept {start}'s weights: no epoch that kept every class on the validation images beat its mean "
                f"validation Dice; the best one (epoch {note['epoch']}, {means}) stayed below it")
    lost = ", ".join(f"{c} by {d:.4f}" for c, d in note["lost"].items())
    return (f"kept {start}'s weights: every epoch lost a class on the validation images; the best one "
            f"(epoch {note['epoch']}, {means}) lost {lost}")


@dataclass
class EpochSelector:
    """Online best-epoch bookkeeping; feed it every evaluated epoch with :meth:`offer`.

    reference: float (C,) per-class validation Dice of the starting weights (the guarded rule), or
               None (the mean rule). tolerance: how far below ``reference`` a class may fall.
    best_epoch: the kept epoch (-1 = the starting weights, None = nothing kept yet);
    best_score: its mean validation Dice (-1.0 before any).
    """

    reference: np.ndarray | None = None
    tolerance: float = GUARD_TOLERANCE
    best_epoch: int | None = None
    best_score: float = -1.0

    def __post_init__(self):
        if not (np.isfinite(self.tolerance) and self.tolerance >= 0):
            raise ValueError(f"selection tolerance must be a finite number >= 0, got {self.tolerance}")
        if self.reference is not None:
            ref = np.asarray(self.reference, dtype=np.float64)
            if ref.ndim != 1 or not np.all(np.isfinite(ref)):
                raise ValueError(f"selection reference must be finite per-class Dice (C,), got {ref!r}")
            self.reference = ref
            if self.best_epoch is None:  # the starting weights are the first candidate
                self.best_epoch, self.best_score = -1, float(ref.mean())

    @classmethod
    def for_rule(cls, rule: str, reference=None, tolerance: float = GUARD_TOLERANCE) -> "EpochSelector":
        """The selector of ``rule`` ('mean' or 'guarded'; guarded needs the starting weights'
        per-class validation Dice as ``reference``: without one it is the mean rule)."""
        if rule not in RULES:
            raise ValueError(f"selection rule must be one of {RULES}, got {rule!r}")
        return cls(reference if rule == "guarded" else None, tolerance)

    def admissible(self, per_class) -> bool:
        """Whether an epoch with per-class validation Dice ``per_class`` (C,) may be kept."""
        d = np.asarray(per_class, dtype=np.float64)
        if not np.all(np.isfinite(d)):
            return False
        if self.reference is None:
            return True
        return not lost_classes(d, self.reference, self.tolerance)

    def offer(self, epoch: int, per_class) -> bool:
        """Consider ``epoch`` with per-class validation Dice ``per_class`` (C,); True when it
        becomes the kept epoch. Without validation data (``per_class`` None or empty) the latest
        epoch is kept under the mean rule."""
        if per_class is None or np.size(per_class) == 0:
            if self.reference is None:
                self.best_epoch = epoch
                return True
            return False
        if self.best_epoch is None and self.reference is None:  # the mean rule keeps something
            finite = bool(np.all(np.isfinite(np.asarray(per_class, dtype=np.float64))))
            self.best_epoch, self.best_score = epoch, float(np.mean(per_class)) if finite else -1.0
            return True
        if not self.admissible(per_class):
            return False
        score = float(np.mean(per_class))
        if score > self.best_score:
            self.best_epoch, self.best_score = epoch, score
            return True
        return False

    def state(self) -> dict:
        """A plain dict to checkpoint (and :meth:`from_state` to resume)."""
        return {"reference": None if self.reference is None else self.reference.tolist(),
                "tolerance": self.tolerance, "best_epoch": self.best_epoch, "best_score": self.best_score}

    @classmethod
    def from_state(cls, state: dict) -> "EpochSelector":
        ref = state.get("reference")
        return cls(None if ref is None else np.asarray(ref, np.float64), float(state["tolerance"]),
                   state.get("best_epoch"), float(state["best_score"]))
