"""Per-class quality gate: keep SAM's mask, keep the cleaned U-Net mask, or drop the class.

For a class the teacher found (non-empty cleaned mask), with SAM's predicted IoU ``sam_iou`` and
the Dice ``agreement`` between the cleaned U-Net mask and SAM's mask:

* policy ``drop``  -> dropped (always ignored when training the student);
* policy ``unet``  -> unet (SAM is not consulted);
* policy ``sam``   -> sam if sam_iou >= min_sam_iou and agreement >= min_agreement else dropped;
* policy ``auto``  -> sam if sam_iou >= min_sam_iou and agreement >= min_agreement;
                      else unet if agreement >= min_agreement_unet; else dropped.

The agreement test guards against SAM answering a different structure than the prompt meant, and
a very low agreement means at least one of the two masks is wrong, so neither is trusted.
A class the teacher did not find is ``empty`` (stored as background, trained as background).
Defaults are conservative; ``plabel run`` calibrates them per class from labelled validation
images (plabel.method.calibration, its ``calibrate`` stage) unless ``label.gate.calibrate`` is false.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from plabel.schemas.config import POLICIES


@dataclass
class ClassGate:
    policy: str = "auto"
    min_sam_iou: float = 0.5
    min_agreement: float = 0.6
    min_agreement_unet: float = 0.3

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"gate policy {self.policy!r} is not one of {POLICIES}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GateConfig:
    """default: the gate of every class; per_class: overrides by class name."""

    default: ClassGate = field(default_factory=ClassGate)
    per_class: dict[str, ClassGate] = field(default_factory=dict)

    def for_class(self, cls: str) -> ClassGate:
        return self.per_class.get(cls, self.default)

    def consults_sam(self, classes) -> bool:
        """Whether any of ``classes`` has a policy that looks at SAM's answer (sam, auto). False: every
        class is dropped or keeps the cleaned U-Net mask whatever SAM says, so the label job skips SAM."""
        return any(self.for_class(c).policy in ("sam", "auto") for c in classes)

    def to_dict(self) -> dict:
        return {"default": self.default.to_dict(), "per_class": {k: v.to_dict() for k, v in self.per_class.items()}}

    @classmethod
    def from_dict(cls, d: dict | None) -> "GateConfig":
        d = d or {}
        return cls(
            default=ClassGate(**d.get("default", {})),
            per_class={k: ClassGate(**v) for k, v in (d.get("per_class") or {}).items()},
        )


SAM_STATES = ("ran", "nonfinite", "off", "unneeded")


def gate_decision(gate: ClassGate, present: bool, sam_iou: float, agreement: float, sam: str = "ran") -> str:
    """THE keep / drop rule for one class of one image: 'sam', 'unet', 'dropped' or 'empty'.

    The label job (plabel.method.labelling.pseudo_label_rows) and the gate's calibration
    (plabel.method.calibration) both call it, so a calibrated gate scores exactly what labelling keeps.

    present: the teacher found the class (non-empty cleaned mask); sam_iou: SAM's predicted IoU of the
    final stage; agreement: Dice(cleaned U-Net mask, SAM's mask).
    sam: "ran" (SAM answered with finite output), "nonfinite" (its IoU or logits for this class were
    NaN or inf: SAM is not trusted, the class keeps the cleaned U-Net mask under the policies that may
    keep it (auto, unet) and is dropped under sam / drop), "off" (no SAM in this run: the cleaned
    U-Net mask is kept), "unneeded" (SAM was skipped because no class's policy consults it,
    GateConfig.consults_sam: drop drops, unet keeps the cleaned U-Net mask; ValueError for sam / auto).
    """
    if sam not in SAM_STATES:
        raise ValueError(f"sam must be one of {SAM_STATES}, got {sam!r}")
    if not present:
        return "empty"
    if sam == "off":
        return "unet"
    if sam == "unneeded":
        if gate.policy in ("sam", "auto"):
            raise ValueError(f"gate policy {gate.policy!r} consults SAM, which was not run")
        return "dropped" if gate.policy == "drop" else "unet"
    if sam == "nonfinite":
        return "unet" if gate.policy in ("auto", "unet") else "dropped"
    if gate.policy == "drop":
        return "dropped"
    sam_ok = np.isfinite(sam_iou) and sam_iou >= gate.min_sam_iou and agreement >= gate.min_agreement
    if gate.policy == "sam":
        return "sam" if sam_ok else "dropped"
    if gate.policy == "unet":
        return "unet"
    if sam_ok:
        return "sam"
    return "unet" if agreement >= gate.min_agreement_unet else "dropped"
