"""Ray-free, in-process versions of two pipeline steps, for benchmarks and experiments.

    fit_unet         train a U-Net on in-memory arrays with plabel.training.loop, keeping the
                     weights of the epoch with the best validation Dice (the selection rule of
                     plabel.jobs.train_job's loop: positive-class weights from the weighted
                     training masks, AdamW + cosine schedule, one generator seeded from
                     cfg.seed for shuffling and augmentation)

Nothing here changes the method; the pipeline's Ray jobs remain the reference.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from plabel.training.selection import GUARD_TOLERANCE
from plabel.training.loop import TrainConfig, build_model, make_optimizer, mean_dice_per_class, train_step, weights_copy


@dataclass
class FitResult:
    """model: the U-Net with the best-validation weights (eval mode, CPU); config: its UNetConfig;
    best_epoch: 0-based epoch of those weights (the last epoch without validation data; -1: the
    starting weights, kept by the guarded rule); best_val_dice: its mean validation Dice (None
    without validation data); history: one {"epoch", "loss", "val_dice", "val_dice_per_class",
    "seconds"} per epoch; reference_val_dice: the starting weights' per-class validation Dice
    (guarded rule only)."""

    model: torch.nn.Module
    config: object
    best_epoch: int
    best_val_dice: float | None
    history: list[dict] = field(default_factory=list)
    reference_val_dice: list | None = None


def _as_float_tensor(a, name: str, ndim: int) -> torch.Tensor:
    t = torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float32)
    if t.ndim != ndim:
        raise ValueError(f"fit_unet: {name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    return t


def positive_fraction(masks, weight) -> np.ndarray:
    """float64 (C,) fraction of positive pixels per class, counting each sample's class with its
    weight (a weight-0 class of a sample counts neither way); clipped to [1e-4, 1] as the
    pipeline's training loop does before plabel.method.losses.positive_class_weights."""
    m = np.asarray(masks)
    w = np.asarray(weight, dtype=np.float64)
    pos = (m.reshape(m.shape[0], m.shape[1], -1).sum(axis=2, dtype=np.float64) * w).sum(axis=0)
    tot = (w * m.shape[2] * m.shape[3]).sum(axis=0)
    return np.clip(pos / np.maximum(tot, 1), 1e-4, 1.0)


def fit_unet(images, masks, cfg: TrainConfig, weight=None, val_images=None, val_masks=None,
             progress: Callable[[dict], None] | None = None, init_state: Mapping | None = None,
             selection: str = "mean", tolerance: float = GUARD_TOLERANCE, distill_weight=None) -> FitResult:
    """Train a U-Net in this process; return the best-validation model.

    images: float32 (N, S, S) in [0, 1]; masks: {0, 1} (N, C, S, S); weight: float (N, C), 0 =
    ignore that class of that sample (plabel.method.losses), None = all 1. val_images / val_masks: the
    same layout for model selection (mean Dice over images and classes after each epoch; the
    first epoch with the highest value wins); None: the last epoch is kept. ``progress`` gets
    each epoch's history entry. init_state: a state dict of the same architecture to start from
    (a student warm-started from its teacher); None: cfg.seed's fresh initialisation.
    selection / tolerance: plabel.training.selection's rule ('guarded' needs init_state and validation data,
    and may keep the starting weights: best_epoch -1). Each history entry carries the per-class
    validation Dice ('val_dice_per_class'). distill_weight: float (N, C) >= 0 or None; where > 0,
    that class of that sample is distilled from the starting weights (init_state, frozen: the
    teacher; plabel.method.losses.distillation_loss). Deterministic for a given cfg.seed on one machine
    and thread count.
    """
    from plabel.training.selection import EpochSelector
    from plabel.method.losses import positive_class_weights
    from plabel.method.unet import UNet

    x = _as_float_tensor(images, "images", 3)[:, None]
    y = _as_float_tensor(masks, "masks", 4)
    n, C = int(y.shape[0]), int(y.shape[1])
    if x.shape[0] != n or x.shape[2:] != y.shape[2:]:
        raise ValueError(f"fit_unet: images {tuple(x.shape)} do not fit masks {tuple(y.shape)}")
    if n == 0:
        raise ValueError("fit_unet: no training images")
    w = torch.ones((n, C)) if weight is None else _as_float_tensor(weight, "weight", 2)
    if tuple(w.shape) != (n, C):
        raise ValueError(f"fit_unet: weight must have shape ({n}, {C}), got {tuple(w.shape)}")
    has_val = val_images is not None and len(val_images) > 0
    if has_val:
        vx = _as_float_tensor(val_images, "val_images", 3)[:, None]
        vy = _as_float_tensor(val_masks, "val_masks", 4)
        if vx.shape[0] != vy.shape[0] or vy.shape[1] != C:
            raise ValueError(f"fit_unet: val_images {tuple(vx.shape)} do not fit val_masks {tuple(vy.shape)}")

    torch.manual_seed(cfg.seed)
    model, ucfg = build_model(cfg, C)

    def validate():
        return mean_dice_per_class(model, vx, vy)

    reference, best_state = None, None
    if init_state is not None:
        model.load_state_dict(init_state)  # RuntimeError naming the keys when architectures differ
        if selection == "guarded" and has_val:
            reference = validate()
            best_state = weights_copy(model)
    selector = EpochSelector.for_rule(selection, reference, tolerance)
    teacher, dw = None, None
    if distill_weight is not None:
        dw = _as_float_tensor(distill_weight, "distill_weight", 2)
        if tuple(dw.shape) != (n, C):
            raise ValueError(f"fit_unet: distill_weight must have shape ({n}, {C}), got {tuple(dw.shape)}")
        if init_state is None:
            raise ValueError("fit_unet: distill_weight needs init_state (the teacher to distil from)")
        teacher, _ = build_model(cfg, C)
        teacher.load_state_dict(init_state)
        teacher.eval()
    opt, sched = make_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(cfg.seed * 1000)  # the pipeline's rank-0 generator
    pos_weight = positive_class_weights(positive_fraction(y.numpy(), w.numpy()), cfg.pos_weight_max)
    history = []
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        perm = torch.randperm(n, generator=gen)
        losses = []
        for k in range(0, n, cfg.batch_size):
            idx = perm[k:k + cfg.batch_size]
            losses.append(train_step(model, opt, x[idx], y[idx], w[idx], pos_weight, cfg, gen,
                                     teacher, None if dw is None else dw[idx]))
        sched.step()
        per_class = validate() if has_val else None
        val_dice = float(per_class.mean()) if has_val else None
        entry = {"epoch": epoch, "loss": float(np.mean(losses)), "val_dice": val_dice,
                 "val_dice_per_class": None if per_class is None else per_class.tolist(),
                 "seconds": round(time.perf_counter() - t0, 3)}
        history.append(entry)
        if progress is not None:
            progress(entry)
        if selector.offer(epoch, per_class):
            best_state = weights_copy(model)
    final = UNet.from_config(ucfg)
    final.load_state_dict(best_state)
    final.eval()
    best = selector.best_score
    return FitResult(final, ucfg, selector.best_epoch, float(best) if has_val and best >= 0 else None, history,
                     reference_val_dice=None if reference is None else reference.tolist())
