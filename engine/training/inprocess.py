"""Training on in-memory arrays, in this process (no Ray), for benchmarks, experiments and tests.

    fit_unet         train a U-Net on in-memory arrays: an adapter that runs THE training loop,
                     plabel.training.loop.fit (the one plabel.jobs.train_job's Ray worker runs), on
                     an in-memory data source (plabel.training.loop.array_batches: a seeded
                     permutation per epoch, the Ray worker's seeds of rank 0) and keeps the weights
                     of the epoch the selection rule picks on the validation images

The loop is the Ray worker's own, so results carry over to `plabel train` / `plabel run`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np
import torch

from plabel.method.unet import UNet
from plabel.training.loop import TrainConfig, array_batches, fit, validation_batches
from plabel.training.selection import GUARD_TOLERANCE


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


def fit_unet(images, masks, cfg: TrainConfig, weight=None, val_images=None, val_masks=None,
             progress: Callable[[dict], None] | None = None, init_state: Mapping | None = None,
             selection: str = "mean", tolerance: float = GUARD_TOLERANCE, distill_weight=None,
             ema: float | None = None) -> FitResult:
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
    teacher; plabel.method.losses.distillation_loss). ema: distil from a mean teacher instead
    (plabel.training.ema: the starting weights, fresh or init_state, averaged towards the student after
    every step with this decay; the mean-teacher baseline). Deterministic for a given cfg.seed on one machine
    and thread count.

    The loop is plabel.training.loop.fit, the Ray worker's: the batches of an epoch follow a permutation
    seeded by loop.shuffle_seed(cfg.seed, epoch) (cfg.shuffle False: the rows' order), augmentation
    draws from a generator seeded cfg.seed * 1000, positive-class weights come from the first 32
    batches of epoch 0 (loop.positive_fraction).
    """
    x = _as_float_tensor(images, "images", 3)
    y = _as_float_tensor(masks, "masks", 4)
    n, C = int(y.shape[0]), int(y.shape[1])
    if x.shape[0] != n or x.shape[1:] != y.shape[2:]:
        raise ValueError(f"fit_unet: images {tuple(x.shape)} do not fit masks {tuple(y.shape)}")
    if n == 0:
        raise ValueError("fit_unet: no training images")
    w = torch.ones((n, C)) if weight is None else _as_float_tensor(weight, "weight", 2)
    if tuple(w.shape) != (n, C):
        raise ValueError(f"fit_unet: weight must have shape ({n}, {C}), got {tuple(w.shape)}")
    has_val = val_images is not None and len(val_images) > 0
    if has_val:
        vx = _as_float_tensor(val_images, "val_images", 3)
        vy = _as_float_tensor(val_masks, "val_masks", 4)
        if vx.shape[0] != vy.shape[0] or vy.shape[1] != C:
            raise ValueError(f"fit_unet: val_images {tuple(vx.shape)} do not fit val_masks {tuple(vy.shape)}")

    arrays = {"image": x, "masks": y, "weight": w}
    if distill_weight is not None:
        dw = _as_float_tensor(distill_weight, "distill_weight", 2)
        if tuple(dw.shape) != (n, C):
            raise ValueError(f"fit_unet: distill_weight must have shape ({n}, {C}), got {tuple(dw.shape)}")
        if init_state is None and ema is None:
            raise ValueError("fit_unet: distill_weight needs init_state (the teacher to distil from) or ema")
        arrays["distill_weight"] = dw
    teacher = None
    if distill_weight is not None and ema is None:  # the starting weights, frozen
        teacher = UNet.from_config(cfg.unet_config(C))
        teacher.load_state_dict(init_state)
    val = validation_batches({"image": vx, "masks": vy}) if has_val else None
    state = fit(cfg, C, array_batches(arrays, cfg.batch_size, seed=cfg.seed, shuffle=cfg.shuffle), val,
                init_state=init_state, selection=selection, tolerance=tolerance, teacher=teacher, ema=ema,
                on_epoch_end=None if progress is None else (lambda s: progress(s.history[-1])))
    final = UNet.from_config(state.config)
    final.load_state_dict(state.best_state)
    final.eval()
    best = state.selector.best_score
    return FitResult(final, state.config, state.best_epoch, float(best) if has_val and best >= 0 else None,
                     state.history, reference_val_dice=state.reference_val_dice)
