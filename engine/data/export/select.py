"""Which rows and masks of a plabel table an export writes, and the state of each exported class.

A row of a pseudo-label table holds per class the gate's decision ``kept`` (sam / unet / dropped /
empty); a row of a prediction table holds the U-Net's mask (state ``unet``, or ``empty`` when it has
no pixel). :func:`export_labels` turns a row into one :class:`ClassLabel` per selected class:

* ``mask``: the class is known on this image: bool (H, W), possibly all background (``empty``);
* ``unknown``: the class is not known on this image: the gate dropped it, or the selection left it
  out (``--kept``, ``--min-score``). Its mask is None; ``box`` is the teacher's box when the table has
  one (formats that can mark unknown pixels, nnU-Net's ``ignore`` label, use it).

The quality score of a class is SAM's predicted IoU where SAM's mask was kept and the U-Net's mean
probability inside the mask where the U-Net's mask was kept (prediction tables: always the latter).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from plabel.schemas.masks import decode_mask
from plabel.schemas.tables import KEPT_VALUES, STATUS_VALUES, class_column, image_uid

# ids become file names: no path separators, no hidden or relative names, nothing a shell trips on
_SAFE_ID = re.compile(r"^[A-Za-z0-9_\-+=,@#][A-Za-z0-9_\-+=,@#.]{0,199}$")


@dataclass(frozen=True)
class Selection:
    """What to export. classes: subset of the table's classes (None: all, in table order);
    status: row statuses to export ('error' rows have no masks and are never written);
    kept: gate decisions whose masks count as known; min_score: classes with a lower quality
    score count as unknown (empty classes have no score and always stay known)."""

    classes: tuple[str, ...] | None = None
    status: tuple[str, ...] = ("ok", "empty")
    kept: tuple[str, ...] = ("sam", "unet", "empty")
    min_score: float | None = None

    def check(self, table_classes: Sequence[str], where: str) -> tuple[str, ...]:
        """The selected classes in table order; ValueError naming ``where`` for unknown names."""
        bad = [s for s in self.status if s not in STATUS_VALUES]
        if bad:
            raise ValueError(f"--status {','.join(bad)}: not a row status (one of {', '.join(STATUS_VALUES)})")
        if "error" in self.status:
            raise ValueError("--status error: error rows have no masks to export")
        bad = [k for k in self.kept if k not in KEPT_VALUES or k == "dropped"]
        if bad:
            raise ValueError(f"--kept {','.join(bad)}: not an exportable gate decision (sam, unet, empty; "
                             "a dropped class has no mask)")
        if self.min_score is not None and not 0.0 <= self.min_score <= 1.0:
            raise ValueError(f"--min-score {self.min_score}: must lie in [0, 1]")
        if self.classes is None:
            return tuple(table_classes)
        missing = [c for c in self.classes if c not in table_classes]
        if missing:
            raise ValueError(f"--classes {','.join(missing)}: not a class of {where} "
                             f"(its classes: {', '.join(table_classes)})")
        if not self.classes:
            raise ValueError("--classes: select at least one class")
        return tuple(c for c in table_classes if c in self.classes)


@dataclass
class ClassLabel:
    """One class of one exported image: state 'sam' / 'unet' / 'empty' (mask is bool (H, W)) or
    'unknown' (mask None); score float or None; box [x0, y0, x1, y1] float or None."""

    state: str
    mask: np.ndarray | None
    score: float | None = None
    box: list[float] | None = None
    decision: str = ""  # the table's own value (e.g. 'dropped' for an unknown class)


@dataclass
class ExportRow:
    """An exportable row: id, where its image lives (shard, key), size, its classes' labels and a
    DICOM source's SOPInstanceUID as labelled (None: not DICOM, or a version-1 table)."""

    id: str
    shard: str
    key: str
    height: int
    width: int
    labels: dict[str, ClassLabel] = field(default_factory=dict)
    sop_instance_uid: str | None = None

    def known(self) -> bool:
        """True when every exported class is known (a mask, possibly empty) on this image."""
        return all(lab.state != "unknown" for lab in self.labels.values())


def safe_id(image_id: str) -> bool:
    """True when the id can be a file name in every format (no '/', no leading '.', <= 200 chars)."""
    return bool(_SAFE_ID.match(image_id)) and image_id not in (".", "..")


def _score(kind: str, state: str, row: Mapping, cls: str) -> float | None:
    name = "sam_iou" if (kind == "pseudo_labels" and state == "sam") else "unet_prob"
    if state not in ("sam", "unet"):
        return None
    value = row.get(class_column(cls, name))
    return None if value is None else float(value)


def export_labels(row: Mapping, kind: str, classes: Sequence[str], sel: Selection) -> dict[str, ClassLabel]:
    """Per selected class, the :class:`ClassLabel` of one table row (status ok / empty).

    row: a table row as a mapping (pyarrow ``to_pylist``); kind: 'pseudo_labels' or 'predictions'.
    """
    h, w = int(row["height"]), int(row["width"])
    out = {}
    for c in classes:
        data = row.get(class_column(c, "mask"))
        if kind == "pseudo_labels":
            decision = row.get(class_column(c, "kept")) or "dropped"
        else:
            decision = "unet" if (row.get(class_column(c, "area")) or 0) > 0 else "empty"
        state = decision if decision in sel.kept else "unknown"
        score = _score(kind, decision, row, c)
        if state in ("sam", "unet") and sel.min_score is not None and (score is None or score < sel.min_score):
            state = "unknown"
        box = row.get(class_column(c, "box")) if kind == "pseudo_labels" else None
        mask = decode_mask(data, h, w) if (state != "unknown" or (box is None and decision == "unet")) else None
        if box is None and mask is not None and mask.any():  # prediction tables: the mask's own box
            ys, xs = np.nonzero(mask)
            box = [float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())]  # inclusive, as prompts.mask_box
        if state == "unknown":
            mask = None
        out[c] = ClassLabel(state, mask, score, None if box is None else [float(v) for v in box], decision)
    return out


def export_row(row: Mapping, kind: str, classes: Sequence[str], sel: Selection) -> ExportRow | str:
    """The :class:`ExportRow` of a table row, or the reason it is not exported (a short text)."""
    status = row["status"]
    if status == "error":
        return "error row (no masks)"
    if status not in sel.status:
        return f"status {status} not selected"
    image_id = str(row["id"])
    if not safe_id(image_id):
        return f"id {image_id!r} cannot be a file name"
    if not row.get("shard") or not row.get("key"):
        return "the row does not say which shard holds its image"
    return ExportRow(image_id, str(row["shard"]), str(row["key"]), int(row["height"]), int(row["width"]),
                     export_labels(row, kind, classes, sel), image_uid(row))
