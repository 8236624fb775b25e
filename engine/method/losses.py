"""Multi-label segmentation loss: per-class BCE-with-logits plus soft Dice.

Every (sample, class) entry carries a weight; weight 0 removes that class of that sample
from the loss entirely (used for classes the pseudo-label quality gate dropped).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _check_pair(logits: torch.Tensor, target: torch.Tensor) -> None:
    if logits.ndim != 4 or logits.shape != target.shape:
        raise ValueError(f"logits and target must both be (N, C, H, W); got logits "
                         f"{tuple(logits.shape)} and target {tuple(target.shape)}")


def bce_per_entry(logits: torch.Tensor, target: torch.Tensor,
                  pos_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Pixel-mean BCE-with-logits of every (sample, class).

    logits, target: float (N, C, H, W); pos_weight: float (C,) or None.
    Returns float (N, C).
    """
    _check_pair(logits, target)
    pw = None
    if pos_weight is not None:
        pw = torch.as_tensor(pos_weight, dtype=logits.dtype, device=logits.device)
        if pw.shape != (logits.shape[1],):
            raise ValueError(f"pos_weight must be (C,)=({logits.shape[1]},), got {tuple(pw.shape)}")
        pw = pw.view(-1, 1, 1)
    bce = F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype),
                                             pos_weight=pw, reduction="none")
    return bce.flatten(2).mean(dim=2)


def soft_dice_per_entry(logits: torch.Tensor, target: torch.Tensor,
                        smooth: float = 1.0) -> torch.Tensor:
    """Soft Dice loss of every (sample, class): 1 - (2 sum(p t) + s) / (sum(p) + sum(t) + s).

    p = sigmoid(logits). logits, target: float (N, C, H, W). Returns float (N, C).
    With ``smooth`` > 0 an empty target predicted empty costs 0.
    """
    _check_pair(logits, target)
    p = torch.sigmoid(logits).flatten(2)
    t = target.to(p.dtype).flatten(2)
    inter = (p * t).sum(dim=2)
    denom = p.sum(dim=2) + t.sum(dim=2)
    return 1.0 - (2.0 * inter + smooth) / (denom + smooth)


def _entry_weight(weight, logits: torch.Tensor, name: str) -> torch.Tensor:
    """``weight`` as a float (N, C) tensor on the logits' device; ValueError naming ``name`` when
    its shape is not the logits' (N, C) or an entry is negative."""
    n, c = logits.shape[:2]
    w = torch.as_tensor(weight, dtype=logits.dtype, device=logits.device)
    if w.shape != (n, c):
        raise ValueError(f"{name} must be (N, C)=({n}, {c}), got {tuple(w.shape)}")
    if bool((w < 0).any()):
        raise ValueError(f"{name} must be >= 0")
    return w


def _weighted_mean(values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    # where() rather than a bare product so a non-finite ignored entry cannot leak in.
    masked = torch.where(weight > 0, values * weight, torch.zeros_like(values))
    return masked.sum() / weight.sum()


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor,
                      class_weight: torch.Tensor | None = None,
                      pos_weight: torch.Tensor | None = None,
                      dice_smooth: float = 1.0) -> torch.Tensor:
    """BCE-with-logits + soft Dice, both averaged over weighted (sample, class) entries.

    logits:       float (N, C, H, W), raw network outputs.
    target:       float (N, C, H, W) in {0, 1}; classes may overlap.
    class_weight: float (N, C) >= 0 or None (all ones). Each term is the weighted mean
                  sum(w * term) / sum(w) over entries; weight 0 ignores that class of that
                  sample (no loss, no gradient).
    pos_weight:   float (C,) or None, BCE weight of positive pixels per class.
    Returns a scalar tensor. When every weight is 0 it is ``0 * logits.sum()``, a zero that
    still has a graph so ``backward()`` works.
    """
    _check_pair(logits, target)
    if class_weight is None:
        w = torch.ones(logits.shape[:2], dtype=logits.dtype, device=logits.device)
    else:
        w = _entry_weight(class_weight, logits, "class_weight")
    if not bool((w > 0).any()):
        return 0.0 * logits.sum()
    bce = bce_per_entry(logits, target, pos_weight)
    dice = soft_dice_per_entry(logits, target, dice_smooth)
    return _weighted_mean(bce, w) + _weighted_mean(dice, w)


def distillation_loss(logits: torch.Tensor, teacher_probs: torch.Tensor,
                      weight: torch.Tensor) -> torch.Tensor:
    """Pixel BCE of the student's logits against the teacher's probabilities (soft targets); for
    each entry it is minimal where sigmoid(logits) equals them.

    logits: float (N, C, H, W); teacher_probs: float (N, C, H, W) in [0, 1]; weight: float (N, C)
    >= 0 (0: no distillation for that entry). Returns sum(weight * BCE) / (number of entries with
    weight > 0), so a weight is the strength of its entry; ``0 * logits.sum()`` when every weight
    is 0. Used to keep the classes a student gets no pseudo labels for (dropped by the gate) close
    to its teacher's outputs (learning without forgetting).
    """
    _check_pair(logits, teacher_probs)
    w = _entry_weight(weight, logits, "distillation weight")
    if not bool((w > 0).any()):
        return 0.0 * logits.sum()
    bce = bce_per_entry(logits, teacher_probs.to(logits.dtype))
    return torch.where(w > 0, w * bce, torch.zeros_like(bce)).sum() / (w > 0).sum()


def distillation_weight(class_weight, strength: float):
    """Where a student is distilled from its teacher: ``strength`` for every (sample, class) entry
    without a label (class weight 0: the quality gate dropped it), 0 elsewhere.

    class_weight: float (N, C) training weights (plabel.schemas.tables.decode_class_masks: 0 or 1),
    a numpy array or a torch tensor; returns float32 (N, C) of the same kind, the ``distill_weight``
    of plabel.training.loop.train_step / :func:`distillation_loss` (all 0 when strength is 0).
    """
    if isinstance(class_weight, torch.Tensor):
        return (class_weight == 0).to(torch.float32) * float(strength)
    return (np.asarray(class_weight) == 0).astype(np.float32) * np.float32(strength)


def positive_class_weights(pos_fraction, max_weight: float = 50.0) -> torch.Tensor:
    """BCE ``pos_weight`` per class from the fraction of positive pixels.

    pos_fraction: float (C,) in [0, 1], fraction of pixels that are positive for each class.
    Returns float32 (C,) = (1 - p) / p clipped to [1 / max_weight, max_weight]
    (p = 0 gives max_weight, p = 1 gives 1 / max_weight).
    """
    p = np.asarray(pos_fraction, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError(f"pos_fraction must be (C,), got shape {p.shape}")
    if not np.all(np.isfinite(p)) or np.any(p < 0) or np.any(p > 1):
        raise ValueError(f"pos_fraction must lie in [0, 1], got {p.tolist()}")
    if max_weight < 1:
        raise ValueError(f"max_weight must be >= 1, got {max_weight}")
    with np.errstate(divide="ignore"):
        w = (1.0 - p) / p
    w = np.clip(w, 1.0 / max_weight, max_weight)
    return torch.from_numpy(w.astype(np.float32))
