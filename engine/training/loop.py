"""Ray-free training logic of the segmentation U-Nets (teacher and student).

The distributed loop owns data loading, epochs and checkpoint timing; this module owns one
optimisation step, the optimiser / schedule and batch evaluation.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from plabel.method.augment import random_affine, random_intensity
from plabel.method.losses import distillation_loss, segmentation_loss
from plabel.method.metrics import dice_per_class
from plabel.method.unet import UNet, UNetConfig, strict_from_dict


@dataclass
class TrainConfig:
    """Hyper-parameters of U-Net training.

    The augmentation magnitudes are passed to :func:`plabel.method.augment.random_affine`
    (``max_translate`` is a fraction of the image size) and
    :func:`plabel.method.augment.random_intensity` (gamma range, contrast).
    """

    epochs: int = 50
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 4
    base_channels: int = 16
    depth: int = 4
    norm: str = "batch"
    augment: bool = True
    seed: int = 0
    pos_weight_max: float = 50.0
    max_rotate_deg: float = 10.0
    max_scale: float = 0.1
    max_translate: float = 0.05
    max_shear_deg: float = 5.0
    gamma_min: float = 0.8
    gamma_max: float = 1.25
    contrast: float = 0.1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        return strict_from_dict(cls, d)

    @classmethod
    def from_section(cls, section, **overrides) -> "TrainConfig":
        """The training config of a run-config section (plabel.schemas.config.TrainSection or
        StudentSection): its epochs, lr, weight_decay, batch_size, base_channels, depth, augment and
        seed; ``overrides`` replace any TrainConfig field (ValueError naming an unknown one). The
        other fields (norm, pos_weight_max, augmentation magnitudes) keep their defaults."""
        keys = ("epochs", "lr", "weight_decay", "batch_size", "base_channels", "depth", "augment", "seed")
        return cls.from_dict({**{k: getattr(section, k) for k in keys}, **overrides})

    def unet_config(self, num_classes: int, in_channels: int = 1) -> UNetConfig:
        """The architecture this training config describes."""
        return UNetConfig(in_channels=in_channels, num_classes=num_classes,
                          base_channels=self.base_channels, depth=self.depth, norm=self.norm)


def build_model(cfg: TrainConfig, num_classes: int, in_channels: int = 1
                ) -> tuple[UNet, UNetConfig]:
    """A freshly initialised U-Net (weights seeded by ``cfg.seed``) and its config."""
    ucfg = cfg.unet_config(num_classes, in_channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = UNet.from_config(ucfg)
    return model, ucfg


def weights_copy(model: nn.Module) -> dict:
    """A detached CPU copy of ``model``'s state dict (the weights of a kept epoch)."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def make_optimizer(model: nn.Module, cfg: TrainConfig
                   ) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.CosineAnnealingLR]:
    """AdamW plus a cosine schedule over ``cfg.epochs``; call ``scheduler.step()`` per epoch."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, int(cfg.epochs)))
    return opt, sched


def augment_batch(images: torch.Tensor, masks: torch.Tensor, cfg: TrainConfig,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random affine (image + masks) then intensity jitter (image only).

    images: float (N, 1, H, W) in [0, 1]; masks: float (N, C, H, W) in {0, 1}.
    """
    images, masks = random_affine(images, masks, generator, cfg.max_rotate_deg, cfg.max_scale,
                                  cfg.max_translate, cfg.max_shear_deg)
    images = random_intensity(images, generator, (cfg.gamma_min, cfg.gamma_max), cfg.contrast)
    return images, masks


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
               masks: torch.Tensor, class_weight: torch.Tensor | None,
               pos_weight: torch.Tensor | None, cfg: TrainConfig,
               generator: torch.Generator, teacher: nn.Module | None = None,
               distill_weight: torch.Tensor | None = None) -> float:
    """One optimisation step; returns the loss as a Python float.

    images: float32 (N, 1, H, W) in [0, 1]; masks: float32 (N, C, H, W) in {0, 1};
    class_weight: float (N, C) (0 = ignore that class of that sample) or None;
    pos_weight: float (C,) or None. Tensors are moved to the model's device.
    generator: CPU torch.Generator driving the augmentation (used only if ``cfg.augment``).
    teacher / distill_weight: optional; the teacher's probabilities on the same augmented images
    are soft targets (plabel.method.losses.distillation_loss) for the entries whose float (N, C)
    distill_weight is > 0, added to the segmentation loss.
    """
    device = next(model.parameters()).device
    images = images.to(device=device, dtype=torch.float32)
    masks = masks.to(device=device, dtype=torch.float32)
    if cfg.augment:
        images, masks = augment_batch(images, masks, cfg, generator)
    model.train()
    logits = model(images)
    if class_weight is not None:
        class_weight = torch.as_tensor(class_weight, dtype=torch.float32, device=device)
    if pos_weight is not None:
        pos_weight = torch.as_tensor(pos_weight, dtype=torch.float32, device=device)
    loss = segmentation_loss(logits, masks, class_weight, pos_weight)
    if teacher is not None and distill_weight is not None:
        dw = torch.as_tensor(distill_weight, dtype=torch.float32, device=device)
        if bool((dw > 0).any()):
            was_training = teacher.training
            teacher.eval()
            with torch.no_grad():
                soft = torch.sigmoid(teacher(images))
            teacher.train(was_training)
            loss = loss + distillation_loss(logits, soft, dw)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def evaluate_batch(model: nn.Module, images: torch.Tensor, masks: torch.Tensor,
                   threshold: float = 0.5) -> np.ndarray:
    """Per-image per-class Dice of ``sigmoid(logits) >= threshold`` against ``masks``.

    images: float (N, 1, H, W); masks: (N, C, H, W) in {0, 1}. Returns float64 (N, C).
    Runs in eval mode without gradients; the model's previous mode is restored.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            probs = torch.sigmoid(model(images.to(device=device, dtype=torch.float32)))
    finally:
        model.train(was_training)
    pred = (probs >= threshold).cpu().numpy()
    truth = masks.detach().cpu().numpy() >= 0.5
    if pred.shape != truth.shape:
        raise ValueError(f"evaluate_batch: predictions {pred.shape} vs masks {truth.shape}")
    return np.stack([dice_per_class(p, t) for p, t in zip(pred, truth)]) if len(pred) else \
        np.zeros((0, truth.shape[1]), dtype=np.float64)


def mean_dice_per_class(model: nn.Module, images: torch.Tensor, masks: torch.Tensor, batch_size: int = 8,
                        threshold: float = 0.5) -> np.ndarray:
    """Per-class Dice averaged over images (:func:`evaluate_batch`, ``batch_size`` images at a time):
    the validation score of model selection. images: float (N, 1, H, W), N >= 1; masks: (N, C, H, W).
    Returns float64 (C,)."""
    return np.concatenate([evaluate_batch(model, images[k:k + batch_size], masks[k:k + batch_size], threshold)
                           for k in range(0, len(images), batch_size)]).mean(axis=0)


def average_weights(states) -> dict:
    """The element-wise mean of state dicts with the same keys and shapes: a weight "soup".

    states: a sequence of >= 1 state dicts (name -> tensor). Floating tensors (weights,
    batch-norm running statistics) are averaged in float64 and cast back to their dtype; integer
    buffers (batch-norm's num_batches_tracked) get the floor of their mean. Meaningful for models
    fine-tuned from one starting point (students warm-started from one teacher); ValueError
    naming the state dict and key that differ.
    """
    states = list(states)
    if not states:
        raise ValueError("average_weights: no state dicts")
    keys = list(states[0])
    for i, sd in enumerate(states[1:], 1):
        if list(sd) != keys:
            extra = sorted(set(sd) ^ set(keys))
            raise ValueError(f"average_weights: state dict {i} has other keys than state dict 0 "
                             f"(differing: {extra[:5] or 'the order'})")
        for k in keys:
            if tuple(sd[k].shape) != tuple(states[0][k].shape):
                raise ValueError(f"average_weights: {k} has shape {tuple(sd[k].shape)} in state dict {i}, "
                                 f"{tuple(states[0][k].shape)} in state dict 0")
    out = {}
    for k in keys:
        ref = states[0][k]
        mean = torch.stack([sd[k].detach().cpu().to(torch.float64) for sd in states]).mean(0)
        out[k] = mean.to(ref.dtype) if ref.is_floating_point() else mean.floor().to(ref.dtype)
    return out


def average_checkpoints(paths, out_path, extra: dict | None = None) -> dict:
    """Write the weight average (:func:`average_weights`) of U-Net checkpoints to ``out_path``.

    paths: >= 1 checkpoints of plabel.method.unet.save_checkpoint with the same UNetConfig (ValueError
    naming the one that differs); paths and out_path may be URIs (plabel.data.storage). The result
    keeps the first checkpoint's metadata, updated with ``extra`` and {"averaged_from": number of
    checkpoints}. Returns the written metadata.
    """
    from plabel.method.unet import load_checkpoint, save_checkpoint

    paths = list(paths)
    if not paths:
        raise ValueError("average_checkpoints: no checkpoints")
    models, meta0, cfg0 = [], None, None
    for p in paths:
        model, cfg, meta = load_checkpoint(p)
        if cfg0 is None:
            cfg0, meta0 = cfg, meta
        elif cfg != cfg0:
            raise ValueError(f"average_checkpoints: {p} is a U-Net {cfg.to_dict()}, {paths[0]} a U-Net "
                             f"{cfg0.to_dict()}; only checkpoints of one architecture can be averaged")
        models.append(model)
    soup = models[0]
    soup.load_state_dict(average_weights([m.state_dict() for m in models]))
    meta = {**meta0, **(extra or {}), "averaged_from": len(paths)}
    save_checkpoint(out_path, soup, cfg0, meta)
    return meta
