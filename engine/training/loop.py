"""THE training loop of the segmentation U-Nets (teacher and student), Ray-free.

    fit            the loop: build or resume the model, positive-class weights, distillation from a
                   teacher (or a mean teacher: plabel.training.ema), epochs of train_step, validation Dice per class, epoch selection
                   (plabel.training.selection), the kept weights, a hook after every epoch.
                   plabel.jobs.train_job's Ray Train worker (Ray dataset shards, checkpoints,
                   resume) and plabel.training.inprocess.fit_unet (arrays) both run it.
    train_step / evaluate_batch / make_optimizer / build_model
                   the step-level pieces.

A data source is a callable ``epoch -> iterable of batches``; a batch is a mapping with
image float32 (N, S, S), masks (N, C, S, S) in {0, 1}, weight float (N, C) (0 = ignore that class of
that sample) and optionally distill_weight float (N, C), as torch tensors or numpy arrays. Each
call must give that epoch's batches in that epoch's order, and the same batches for the same epoch
(a seeded shuffle: :func:`array_batches` in memory, in process and in a Ray Train worker whose
training set is small; Ray Data's seeded local shuffle in a worker that streams a large one; both
seeded by :func:`shuffle_seed`).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Mapping

import numpy as np
import torch
from torch import nn

from plabel.method.augment import random_affine, random_intensity
from plabel.method.losses import distillation_loss, distillation_weight, positive_class_weights, segmentation_loss
from plabel.method.metrics import dice_per_class
from plabel.method.unet import UNet, UNetConfig, strict_from_dict
from plabel.training.ema import ema_update, mean_teacher
from plabel.training.precision import autocast, resolve_precision
from plabel.training.selection import GUARD_TOLERANCE, EpochSelector

# positive-class weights are measured on (up to) this many batches of epoch 0 (:func:`positive_fraction`)
POS_WEIGHT_BATCHES = 32
# validation batches hold this many images
VAL_BATCH_SIZE = 8

Batches = Callable[[int], Iterable[Mapping]]


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
    shuffle: bool = True  # reshuffle the training set every epoch (:func:`shuffle_seed`); False: the source's order
    pos_weight_max: float = 50.0
    max_rotate_deg: float = 10.0
    max_scale: float = 0.1
    max_translate: float = 0.05
    max_shear_deg: float = 5.0
    # elastic warp before the affine: largest displacement as a fraction of the image side (0: none;
    # plabel.method.augment.sample_elastic)
    elastic: float = 0.0
    gamma_min: float = 0.8
    gamma_max: float = 1.25
    contrast: float = 0.1
    # forward passes of a training step: fp32, bf16 autocast, or auto (bf16 where native:
    # plabel.training.precision); channels_last: NHWC activations and weights, the same maths
    # with faster convolutions on CPU (benchmarks/RESULTS.md, section 10)
    precision: str = "fp32"
    channels_last: bool = True
    # the gray-level normalisation the U-Net is trained with (plabel.method.preprocess.normalise_intensity);
    # recorded in its UNetConfig. The caller builds the images with it: the loop sees float tensors only
    intensity: str = "fixed"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        return strict_from_dict(cls, d)

    @classmethod
    def from_section(cls, section, **overrides) -> "TrainConfig":
        """The training config of a run-config section (plabel.schemas.config.TrainSection or
        StudentSection): its epochs, lr, weight_decay, batch_size, base_channels, depth, augment,
        elastic and seed, precision, channels_last, intensity; ``overrides`` replace any TrainConfig field (ValueError naming an unknown one). The
        other fields (norm, pos_weight_max, augmentation magnitudes) keep their defaults."""
        keys = ("epochs", "lr", "weight_decay", "batch_size", "base_channels", "depth", "augment", "elastic", "seed",
                "precision", "channels_last", "intensity")
        return cls.from_dict({**{k: getattr(section, k) for k in keys}, **overrides})

    def unet_config(self, num_classes: int, in_channels: int = 1) -> UNetConfig:
        """The architecture this training config describes."""
        return UNetConfig(in_channels=in_channels, num_classes=num_classes,
                          base_channels=self.base_channels, depth=self.depth, norm=self.norm,
                          intensity=self.intensity)


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
                                  cfg.max_translate, cfg.max_shear_deg, cfg.elastic)
    images = random_intensity(images, generator, (cfg.gamma_min, cfg.gamma_max), cfg.contrast)
    return images, masks


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
               masks: torch.Tensor, class_weight: torch.Tensor | None,
               pos_weight: torch.Tensor | None, cfg: TrainConfig,
               generator: torch.Generator, teacher: nn.Module | None = None,
               distill_weight: torch.Tensor | None = None, teacher_noise: bool = False) -> float:
    """One optimisation step; returns the loss as a Python float.

    images: float32 (N, 1, H, W) in [0, 1]; masks: (N, C, H, W) in {0, 1}, any dtype (the Ray Train
    worker's are uint8), cast to float32 here;
    class_weight: float (N, C) (0 = ignore that class of that sample) or None;
    pos_weight: float (C,) or None. Tensors are moved to the model's device.
    generator: CPU torch.Generator driving the augmentation (used only if ``cfg.augment``).
    teacher / distill_weight: optional; the teacher's probabilities on the same augmented images
    are soft targets (plabel.method.losses.distillation_loss) for the entries whose float (N, C)
    distill_weight is > 0, added to the segmentation loss. teacher_noise: the teacher sees its own
    intensity jitter of the augmented images (the mean teacher's consistency under noise).
    """
    device = next(model.parameters()).device
    images = images.to(device=device, dtype=torch.float32)
    masks = masks.to(device=device, dtype=torch.float32)
    if cfg.augment:
        images, masks = augment_batch(images, masks, cfg, generator)
    if cfg.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    precision = resolve_precision(cfg.precision, device)
    model.train()
    with autocast(precision, device):
        logits = model(images)
    logits = logits.float()
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
            t_in = random_intensity(images, generator, (cfg.gamma_min, cfg.gamma_max), cfg.contrast) \
                if teacher_noise else images
            with torch.no_grad(), autocast(precision, device):
                soft = torch.sigmoid(teacher(t_in).float())
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


def validation_dice(model: nn.Module, batches: Iterable[Mapping], threshold: float = 0.5) -> np.ndarray:
    """The validation score of model selection: per-class Dice (:func:`evaluate_batch`) averaged
    over the images of ``batches`` (mappings with image (N, S, S) and masks (N, C, S, S)). Returns
    float64 (C,); (0,) when the batches hold no image."""
    dices = [evaluate_batch(model, torch.as_tensor(b["image"])[:, None], torch.as_tensor(b["masks"]), threshold)
             for b in batches]
    per_image = np.concatenate(dices) if dices else np.zeros((0, 0))
    return per_image.mean(axis=0) if len(per_image) else np.zeros(0)


def mean_dice_per_class(model: nn.Module, images: torch.Tensor, masks: torch.Tensor, batch_size: int = VAL_BATCH_SIZE,
                        threshold: float = 0.5) -> np.ndarray:
    """:func:`validation_dice` of in-memory images float (N, 1, H, W), N >= 1, and masks (N, C, H, W),
    ``batch_size`` images at a time. Returns float64 (C,)."""
    if len(images) == 0:
        raise ValueError("mean_dice_per_class: no images")
    return validation_dice(model, ({"image": images[k:k + batch_size, 0], "masks": masks[k:k + batch_size]}
                                   for k in range(0, len(images), batch_size)), threshold)


# ----------------------------------------------------------------------------- data sources


def shuffle_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """The seed of worker ``rank``'s shuffle in ``epoch`` of a run seeded ``seed``: the Ray worker's
    local_shuffle_seed and :func:`array_batches`' permutation."""
    return (int(seed) * 1009 + int(rank)) * 1009 + int(epoch)


def array_batches(arrays: Mapping[str, torch.Tensor], batch_size: int, seed: int = 0, shuffle: bool = True,
                  rank: int = 0) -> Batches:
    """An in-memory data source: ``epoch -> batches`` of ``batch_size`` rows of the same-length
    tensors in ``arrays`` (image, masks, weight, ...), in the order of
    ``torch.randperm(n, generator=torch.Generator().manual_seed(shuffle_seed(seed, epoch, rank)))``
    (shuffle) or in row order (not shuffle). The last batch may be smaller."""
    n = len(next(iter(arrays.values())))
    if any(len(a) != n for a in arrays.values()):
        raise ValueError(f"array_batches: arrays of different lengths {[len(a) for a in arrays.values()]}")

    def batches(epoch: int):
        order = (torch.randperm(n, generator=torch.Generator().manual_seed(shuffle_seed(seed, epoch, rank)))
                 if shuffle else torch.arange(n))
        for k in range(0, n, batch_size):
            idx = order[k:k + batch_size]
            yield {name: a[idx] for name, a in arrays.items()}

    return batches


def validation_batches(arrays: Mapping[str, torch.Tensor] | None, batch_size: int = VAL_BATCH_SIZE):
    """The validation source of :func:`fit`: a callable ``() -> batches`` of ``batch_size`` rows of
    ``arrays`` (image, masks) in row order, the same batches every call; no batches when ``arrays``
    is None or empty. fit_unet and the Ray Train worker's in-memory path both validate through it."""
    if not arrays:
        return lambda: iter(())
    fixed = array_batches(arrays, batch_size, shuffle=False)
    return lambda: fixed(0)


def positive_fraction(batches: Iterable[Mapping], max_batches: int = POS_WEIGHT_BATCHES) -> np.ndarray:
    """The fraction of positive pixels per class over the first (up to) ``max_batches`` batches,
    each sample's class counted with its weight (a weight-0 class of a sample counts neither way),
    clipped to [1e-4, 1]: float64 (C,), the input of plabel.method.losses.positive_class_weights.

    The loop measures it on epoch 0's batches of its data source (for a Ray worker: its shard, in
    the shuffled order of epoch 0), so a resumed run gets the same weights."""
    pos = tot = None
    for j, b in enumerate(batches):
        if j >= max_batches:
            break
        m = torch.as_tensor(b["masks"]).to("cpu", torch.float64)  # a Ray Train GPU worker's batches arrive on the GPU
        w = torch.as_tensor(b["weight"]).to("cpu", torch.float64)
        p = (m.flatten(2).sum(2) * w).sum(0)
        t = w.sum(0) * (m.shape[2] * m.shape[3])
        pos, tot = (p, t) if pos is None else (pos + p, tot + t)
    if pos is None:
        raise ValueError("positive_fraction: no training batches")
    return np.clip((pos / tot.clamp(min=1)).numpy(), 1e-4, 1.0)


# ----------------------------------------------------------------------------- the loop


@dataclass
class TrainState:
    """Where a :func:`fit` run stands; what ``on_epoch_end`` sees after every epoch, and what it returns.

    model: the trained module (as ``prepare`` returned it); base: the U-Net inside it; config: its
    UNetConfig. epoch: the last finished epoch (start_epoch - 1 before the first); start_epoch: the
    first epoch this call runs (> 0 when resumed). selector: the epoch selection; best_state: a CPU
    copy of the kept weights, best_epoch their epoch (-1: the starting weights),
    best_val_dice_per_class their per-class validation Dice ([] without validation data).
    history: one {"epoch", "loss", "val_dice" (None without validation data), "val_dice_per_class",
    "seconds", "step_seconds", "val_seconds"} per epoch run by this call (the epoch's wall time,
    its optimisation steps', its validation's). reference_val_dice: the starting weights' per-class
    validation Dice (guarded rule) or None. pos_weight: the positive-class weights (C,).
    ema_teacher: the mean teacher (fit's ``ema``) or None.
    """

    model: nn.Module
    base: nn.Module
    config: UNetConfig
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator
    selector: EpochSelector | None = None
    epoch: int = -1
    start_epoch: int = 0
    best_state: dict | None = None
    best_epoch: int | None = None
    best_val_dice_per_class: list | None = None
    history: list[dict] = field(default_factory=list)
    reference_val_dice: list | None = None
    pos_weight: torch.Tensor | None = None
    ema_teacher: nn.Module | None = None

    def keep(self, epoch: int, per_class) -> None:
        """Keep the current weights as those of ``epoch`` with per-class validation Dice ``per_class``."""
        self.best_state = weights_copy(self.base)
        self.best_epoch = epoch
        self.best_val_dice_per_class = [] if per_class is None else np.asarray(per_class, np.float64).tolist()

    @property
    def best_val_dice(self) -> float | None:
        """The kept weights' mean validation Dice; None without validation data."""
        d = self.best_val_dice_per_class
        return float(np.mean(d)) if d else None

    def checkpoint(self) -> dict:
        """The training state after :attr:`epoch`, for ``fit(resume=...)``: model, optimizer,
        scheduler, epoch, selector (its state), best (its best score), generator (the augmentation
        generator's state), and the kept weights: best_state, best_epoch, best_val_dice_per_class
        (the Ray worker stores those three as its model.pt); with a mean teacher, its weights (ema_teacher)."""
        return {**({"ema_teacher": self.ema_teacher.state_dict()} if self.ema_teacher is not None else {}),"model": self.base.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "epoch": self.epoch,
                "best": self.selector.best_score, "selector": self.selector.state(),
                "generator": self.generator.get_state(), "best_state": self.best_state,
                "best_epoch": self.best_epoch, "best_val_dice_per_class": self.best_val_dice_per_class}


def fit(cfg: TrainConfig, num_classes: int, train_batches: Batches, val_batches: Callable[[], Iterable[Mapping]] | None
        = None, *, init_state: Mapping | None = None, selection: str = "mean", tolerance: float = GUARD_TOLERANCE,
        teacher: nn.Module | None = None, distill: float = 0.0, ema: float | None = None,
        resume: Mapping | None = None,
        prepare: Callable[[nn.Module], nn.Module] | None = None, rank: int = 0,
        on_epoch_end: Callable[[TrainState], None] | None = None,
        log: Callable[[str], None] | None = None) -> TrainState:
    """Train a U-Net of ``num_classes`` classes for epochs ``start_epoch .. cfg.epochs - 1``; return its TrainState.

    train_batches: the data source (``epoch -> batches``, see the module docstring); val_batches:
    ``() -> batches`` of the validation images, or None (no validation: the last epoch is kept).
    init_state: the weights to start from (a student warm-started from its teacher); None: cfg.seed's
    fresh U-Net. selection / tolerance: plabel.training.selection's rule; 'guarded' with init_state
    and validation data measures the starting weights first and may keep them (best_epoch -1).
    teacher / distill: a frozen U-Net whose soft outputs (plabel.method.losses.distillation_loss)
    train, per batch, the entries of its ``distill_weight`` (N, C) if the batch has one, otherwise
    ``plabel.method.losses.distillation_weight(weight, distill)`` (the classes the quality gate dropped).
    ema: a mean teacher instead (plabel.training.ema; ``teacher`` must be None): a copy of the starting
    weights, averaged towards the student after every step with this decay, whose outputs on its own
    intensity jitter of each batch are the targets of the same entries. resume: a
    :meth:`TrainState.checkpoint` (best_* may be missing; a checkpoint without 'selector' is one of
    the mean rule, its best score in 'best'); the run continues after its epoch, init_state is ignored.
    prepare: wraps the model before the optimiser is built (Ray Train's prepare_model: device, DDP).
    rank: the worker's rank (seeds its augmentation generator, cfg.seed * 1000 + rank).
    on_epoch_end(state): after every epoch (the Ray worker reports its checkpoint there). log: gets
    progress lines. Deterministic for one cfg.seed, data source, machine and thread count.
    """
    # the model: resumed, warm-started or cfg.seed's fresh U-Net; then wrapped, then its optimiser
    torch.manual_seed(cfg.seed)
    model, ucfg = build_model(cfg, num_classes)
    if resume is not None:
        model.load_state_dict(resume["model"])
    elif init_state is not None:
        model.load_state_dict(init_state)  # RuntimeError naming the keys when architectures differ
    if cfg.channels_last:  # before prepare: DDP keeps the parameters' layout
        model = model.to(memory_format=torch.channels_last)
    if prepare is not None:
        model = prepare(model)
    base = model.module if hasattr(model, "module") else model
    device = next(base.parameters()).device
    say_precision = resolve_precision(cfg.precision, device)
    opt, sched = make_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank)  # the augmentation's
    state = TrainState(model, base, ucfg, opt, sched, gen)
    say = log or (lambda line: None)
    if say_precision != "fp32" or cfg.channels_last:
        say(f"training in {say_precision}{' (autocast)' if say_precision == 'bf16' else ''}"
            f"{', channels_last' if cfg.channels_last else ''}")

    def validate() -> np.ndarray:
        """Per-class mean validation Dice (C,) of the current weights; (0,) without validation data."""
        return np.zeros(0) if val_batches is None else validation_dice(base, val_batches())

    # epoch selection: restored, or fresh (guarded: the starting weights are the first candidate)
    if resume is not None:
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        if resume.get("generator") is not None:
            gen.set_state(resume["generator"])
        state.start_epoch = int(resume["epoch"]) + 1
        state.epoch = int(resume["epoch"])
        state.best_state = resume.get("best_state")
        state.best_epoch = resume.get("best_epoch")
        state.best_val_dice_per_class = resume.get("best_val_dice_per_class")
        if resume.get("selector") is not None:
            state.selector = EpochSelector.from_state(resume["selector"])
        else:  # a checkpoint written before plabel.training.selection: the mean rule it used
            kept = state.best_epoch
            state.selector = EpochSelector(None, tolerance, None if kept is None else int(kept), float(resume["best"]))
        if state.selector.reference is not None:
            state.reference_val_dice = state.selector.reference.tolist()
    else:
        reference = None
        if selection == "guarded" and init_state is not None:
            reference = validate()
            if len(reference):
                state.keep(-1, reference)
                state.reference_val_dice = reference.tolist()
                say(f"starting weights: val dice per class {np.round(reference, 4).tolist()} (guarded selection)")
            else:
                reference = None
        state.selector = EpochSelector.for_rule(selection, reference, tolerance)

    # positive-class weights: the first POS_WEIGHT_BATCHES batches of epoch 0 (the same when resumed)
    state.pos_weight = positive_class_weights(positive_fraction(train_batches(0)), cfg.pos_weight_max)

    # distillation: the frozen teacher's (or the mean teacher's) soft outputs for the entries without labels
    if ema is not None:
        if teacher is not None:
            raise ValueError("fit: give a teacher or ema (a mean teacher), not both")
        teacher = mean_teacher(base)
        if resume is not None and resume.get("ema_teacher") is not None:
            teacher.load_state_dict(resume["ema_teacher"])
        state.ema_teacher = teacher
    if teacher is not None:
        teacher = teacher.to(device).eval()
        if cfg.channels_last:
            teacher = teacher.to(memory_format=torch.channels_last)

    for epoch in range(state.start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        losses, step_s = [], 0.0
        for b in train_batches(epoch):
            s0 = time.perf_counter()
            weight = torch.as_tensor(b["weight"], dtype=torch.float32)
            dw = None
            if teacher is not None:
                dw = b["distill_weight"] if "distill_weight" in b else distillation_weight(weight, distill)
            losses.append(train_step(model, opt, torch.as_tensor(b["image"])[:, None], torch.as_tensor(b["masks"]),
                                     weight, state.pos_weight, cfg, gen, teacher, dw, teacher_noise=ema is not None))
            if ema is not None:
                ema_update(teacher, base, ema)
            step_s += time.perf_counter() - s0
        sched.step()
        v0 = time.perf_counter()
        per_class = validate()
        val_s, seconds = time.perf_counter() - v0, time.perf_counter() - t0
        val_dice = float(per_class.mean()) if len(per_class) else None
        state.epoch = epoch
        state.history.append({"epoch": epoch, "loss": float(np.mean(losses)) if losses else float("nan"),
                              "val_dice": val_dice, "val_dice_per_class": per_class.tolist() if len(per_class) else None,
                              "seconds": round(seconds, 3), "step_seconds": round(step_s, 3),
                              "val_seconds": round(val_s, 3)})
        # the epoch's time: its optimisation steps, its validation, and the rest (waiting for batches)
        say(f"epoch {epoch + 1}/{cfg.epochs}: loss {state.history[-1]['loss']:.4f}, "
            f"val dice {float('nan') if val_dice is None else val_dice:.4f}, {seconds:.2f} s "
            f"(steps {step_s:.2f}, validation {val_s:.2f}, batches {seconds - step_s - val_s:.2f})")
        if state.selector.offer(epoch, per_class) or state.best_state is None:
            state.keep(epoch, per_class)
        if on_epoch_end is not None:
            on_epoch_end(state)
    return state
