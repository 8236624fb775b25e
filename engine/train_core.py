"""Ray-free training logic of the segmentation U-Nets (teacher and student).

The distributed loop owns data loading, epochs and checkpoint timing; this module owns one
optimisation step, the optimiser / schedule and batch evaluation.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from engine.augment import random_affine, random_intensity
from engine.losses import distillation_loss, segmentation_loss
from engine.metrics import dice_per_class
from engine.unet import UNet, UNetConfig, strict_from_dict


@dataclass
class TrainConfig:
    """Hyper-parameters of U-Net training.

    The augmentation magnitudes are passed to :func:`engine.augment.random_affine`
    (``max_translate`` is a fraction of the image size) and
    :func:`engine.augment.random_intensity` (gamma range, contrast).
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
    are soft targets (engine.losses.distillation_loss) for the entries whose float (N, C)
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
