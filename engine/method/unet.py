"""2-D U-Net for multi-label segmentation, its checkpoint format and batched prediction.

The network emits one logit channel per class; classes may overlap, so each channel is read
through its own sigmoid (never a softmax across channels).

Checkpoints are plain ``torch.save`` dicts that load with ``torch.load(weights_only=True)``::

    {"format": "plabel-unet-v1", "state_dict": {...}, "config": {...}, "extra": {...}}

``config`` is ``UNetConfig.to_dict()``; ``extra`` holds caller metadata of plain types only
(dict / list / tuple / str / int / float / bool / None).
"""
from __future__ import annotations

import io
import os
import pickle
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from plabel.data import storage
from plabel.errors import InputError
from plabel.data.files import sha256_file
from plabel.method.preprocess import INTENSITIES

CHECKPOINT_FORMAT = "plabel-unet-v1"
_NORMS = ("batch", "group")


@dataclass
class UNetConfig:
    """Architecture of a :class:`UNet`.

    in_channels:   input channels (1 for grey-level X-rays).
    num_classes:   output channels, one sigmoid per class.
    base_channels: channels of the first level; level ``i`` has ``base_channels * 2**i``.
    depth:         number of 2x down-samplings (the bottleneck sits at level ``depth``).
    norm:          "batch" (BatchNorm2d) or "group" (GroupNorm, better for tiny batches).
    intensity:     how its input's gray levels were normalised in training, so that every caller
                   applies the same (plabel.method.preprocess.to_unet_input): "fixed" (gray / 255;
                   checkpoints written before the key existed load as fixed) or "minmax".
    """

    in_channels: int = 1
    num_classes: int = 1
    base_channels: int = 16
    depth: int = 4
    norm: str = "batch"
    intensity: str = "fixed"

    def __post_init__(self) -> None:
        for name in ("in_channels", "num_classes", "base_channels"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"UNetConfig.{name} must be >= 1, got {getattr(self, name)}")
        if int(self.depth) < 0:
            raise ValueError(f"UNetConfig.depth must be >= 0, got {self.depth}")
        if self.norm not in _NORMS:
            raise ValueError(f"UNetConfig.norm must be one of {_NORMS}, got {self.norm!r}")
        if self.intensity not in INTENSITIES:
            raise ValueError(f"UNetConfig.intensity must be one of {INTENSITIES}, got {self.intensity!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        return strict_from_dict(cls, d)


def strict_from_dict(cls, d: dict):
    """Dataclass ``cls`` from a dict; unknown keys raise ValueError naming them."""
    unknown = sorted(set(d) - {f.name for f in fields(cls)})
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys: {unknown}")
    return cls(**d)


def _norm_layer(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    # Largest group count <= 8 that divides the channel count.
    groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


class _DoubleConv(nn.Sequential):
    """(3x3 conv -> norm -> ReLU) twice; spatial size unchanged."""

    def __init__(self, c_in: int, c_out: int, norm: str) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            _norm_layer(norm, c_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
            _norm_layer(norm, c_out),
            nn.ReLU(inplace=True),
        )


class UNet(nn.Module):
    """U-Net: max-pool encoder, bilinear-upsampling decoder with skip connections.

    forward(x: float32 (N, in_channels, H, W)) -> logits float32 (N, num_classes, H, W).
    Any H, W are accepted: the input is zero-padded at the bottom/right up to a multiple of
    ``2**depth`` and the logits are cropped back to (H, W). ``intensity`` is recorded in
    ``config`` for the callers that build x (plabel.method.preprocess.to_unet_input); forward does
    not use it.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 1, base_channels: int = 16,
                 depth: int = 4, norm: str = "batch", intensity: str = "fixed") -> None:
        super().__init__()
        self.config = UNetConfig(in_channels, num_classes, base_channels, depth, norm, intensity)
        widths = [base_channels * 2**i for i in range(depth + 1)]
        self.encoders = nn.ModuleList()
        c_prev = in_channels
        for w in widths:
            self.encoders.append(_DoubleConv(c_prev, w, norm))
            c_prev = w
        # Decoder level i fuses the upsampled level i+1 with the skip of level i.
        self.decoders = nn.ModuleList(
            _DoubleConv(widths[i + 1] + widths[i], widths[i], norm) for i in reversed(range(depth))
        )
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    @classmethod
    def from_config(cls, config: UNetConfig) -> "UNet":
        return cls(config.in_channels, config.num_classes, config.base_channels, config.depth,
                   config.norm, config.intensity)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"UNet expects input (N, {self.config.in_channels}, H, W), "
                             f"got {tuple(x.shape)}")
        h, w = x.shape[-2:]
        m = 2**self.config.depth
        pad_h, pad_w = (-h) % m, (-w) % m
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        skips = []
        for i, enc in enumerate(self.encoders):
            if i > 0:
                x = F.max_pool2d(x, 2)
            x = enc(x)
            skips.append(x)
        x = skips.pop()
        for dec in self.decoders:
            skip = skips.pop()
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = dec(torch.cat([x, skip], dim=1))
        return self.head(x)[..., :h, :w]


# ----------------------------------------------------------------------------- checkpoints

_PLAIN_SCALARS = (str, int, float, bool, type(None))


def _check_plain(value: Any, where: str) -> None:
    """Raise TypeError unless ``value`` is built from plain types only (weights_only-safe)."""
    if isinstance(value, _PLAIN_SCALARS):
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"checkpoint extra{where}: key {k!r} is not str/int")
            _check_plain(v, f"{where}[{k!r}]")
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
        return
    raise TypeError(f"checkpoint extra{where} has type {type(value).__name__}; only "
                    "dict/list/tuple/str/int/float/bool/None are allowed")


def save_checkpoint(path: str | os.PathLike, model: UNet, config: UNetConfig,
                    extra: dict | None = None) -> None:
    """Write ``model`` atomically to a local path or an object-store URI (plabel.data.storage.write_bytes).

    extra: plain-typed metadata (epoch, metrics, data hashes...); TypeError otherwise.
    Tensors are moved to CPU so the file loads anywhere.
    """
    extra = {} if extra is None else extra
    if not isinstance(extra, dict):
        raise TypeError(f"checkpoint extra must be a dict, got {type(extra).__name__}")
    _check_plain(extra, "")
    payload = {
        "format": CHECKPOINT_FORMAT,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "config": config.to_dict(),
        "extra": extra,
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    storage.write_bytes(os.fspath(path), buffer.getvalue())  # atomic: temp file + rename, or one PUT


class CheckpointError(InputError):
    """A file that is not a loadable plabel U-Net checkpoint, or whose classes do not fit the data."""


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu"
                    ) -> tuple[UNet, UNetConfig, dict]:
    """Load a checkpoint written by :func:`save_checkpoint` with ``weights_only=True``.

    Returns (model in eval mode on ``device``, config, extra). ``path`` may be a URI (``s3://``,
    ``gs://``): the file is loaded from a local cached copy (plabel.data.storage.local_copy).
    Raises FileNotFoundError for a missing file and CheckpointError (naming the file) for one
    that is not a plabel checkpoint: not a PyTorch file, truncated, another format, weights that
    do not fit its architecture, or a pickle that needs full unpickling (it could run code).
    """
    name = storage.redact(os.fspath(path))
    path = os.fspath(storage.local_copy(os.fspath(path)))
    if os.path.isdir(path):
        raise CheckpointError(f"{name} is a folder, not a checkpoint file")
    with open(path, "rb") as fh:
        head = fh.read(4)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # torch.save's zip, or a legacy pickle
        what = "an empty file" if not head else f"starts with {head!r}, not a zip or pickle"
        raise CheckpointError(f"{name} is not a plabel checkpoint (not a PyTorch file: {what})")
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{name} is not a plabel checkpoint: it needs full pickle loading "
                              f"(weights_only=False), which could run code; refused "
                              f"({str(exc).split('.')[0][:120]})") from exc
    except OSError:
        raise
    except Exception as exc:  # torch.load raises many types on foreign bytes (KeyError, IndexError, EOFError ...)
        reason = " ".join(f"{type(exc).__name__}: {str(exc)[:120]}".split())  # (an empty file failed the signature)
        raise CheckpointError(f"{name} is not a plabel checkpoint (not a readable PyTorch file: {reason})") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{name} is not a {CHECKPOINT_FORMAT} checkpoint")
    try:
        config = UNetConfig.from_dict(payload["config"])
        model = UNet.from_config(config)
        model.load_state_dict(payload["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{name}: a damaged {CHECKPOINT_FORMAT} checkpoint ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:160]})") from exc
    model.to(device).eval()
    return model, config, payload.get("extra", {})


def check_classes(extra: dict, classes: list[str], name: str) -> None:
    """Raise CheckpointError when the checkpoint's classes (``extra["classes"]``) differ from the
    data's ``classes``, naming both lists. A checkpoint without recorded classes passes."""
    own = extra.get("classes")
    if own is not None and list(own) != list(classes):
        raise CheckpointError(f"{name} was trained on classes {list(own)}, the data has {list(classes)}")


def starting_point_differences(found: UNetConfig, want: UNetConfig, use: str) -> list[str]:
    """The UNetConfig fields in which a checkpoint (architecture ``found``) does not fit a U-Net of
    architecture ``want`` that starts from it (``use`` 'init': its weights, so every field counts)
    or distils from it ('distill': its probabilities, so only num_classes and intensity count);
    intensity first. [] when it fits."""
    if use not in ("init", "distill"):
        raise ValueError(f"use must be 'init' or 'distill', got {use!r}")
    names = ["intensity", "num_classes"] if use == "distill" else \
        ["intensity"] + [f.name for f in fields(UNetConfig) if f.name != "intensity"]
    return [n for n in names if getattr(found, n) != getattr(want, n)]


def check_starting_point(name: str, found: UNetConfig, want: UNetConfig, use: str, role: str) -> None:
    """CheckpointError naming the checkpoint ``name`` and each field with both values when it does
    not fit (:func:`starting_point_differences`); ``role`` ('teacher' or 'student') names the U-Net
    being trained. A U-Net must read images as the one it starts or learns from, so a different
    intensity gets its own message."""
    diff = starting_point_differences(found, want, use)
    verb = "start from its weights" if use == "init" else "distil from it"
    if "intensity" in diff:
        raise CheckpointError(f"{name} was trained with intensity {found.intensity}, this {role} with "
                              f"{want.intensity}; a U-Net must read images as the one it learns from; cannot {verb}")
    if diff:
        told = ", ".join(f"{n} ({getattr(found, n)} against {getattr(want, n)})" for n in diff)
        raise CheckpointError(f"{name}: its U-Net differs from the {role}'s in {told}; cannot {verb}")


def checkpoint_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of the checkpoint file's bytes (a URI is hashed from its local cached copy)."""
    return sha256_file(storage.local_copy(os.fspath(path)))


# ----------------------------------------------------------------------------- prediction

# Gammas of the intensity test-time augmentation; flips are deliberately not used because
# left/right anatomical classes (e.g. left/right lung) would swap under a horizontal flip.
TTA_GAMMAS = (1.0, 0.8, 1.25)


def predict_probs(model: nn.Module, images: np.ndarray, batch_size: int = 8,
                  tta: bool = False) -> np.ndarray:
    """Sigmoid probabilities of ``model`` on ``images``.

    images: float32 (N, H, W) in [0, 1]. Returns float32 (N, C, H, W).
    Runs without gradients in eval mode (the model's previous mode is restored), on the
    device of the model's parameters.
    tta: off by default. When on, probabilities are averaged over the gamma corrections
    ``TTA_GAMMAS`` (intensity-only TTA; no flips, which would swap left/right classes).
    """
    images = np.asarray(images)
    if images.ndim != 3:
        raise ValueError(f"predict_probs expects images (N, H, W), got shape {images.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    gammas = TTA_GAMMAS if tta else (1.0,)
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                x = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size],
                                                          dtype=np.float32))
                x = x.to(device)[:, None]
                acc = None
                for g in gammas:
                    xi = x if g == 1.0 else x.clamp(0.0, 1.0).pow(g)
                    p = torch.sigmoid(model(xi).float())
                    acc = p if acc is None else acc + p
                out.append((acc / len(gammas)).cpu().numpy())
    finally:
        model.train(was_training)
    if not out:
        c = model.config.num_classes if hasattr(model, "config") else 0
        return np.zeros((0, c) + images.shape[1:], dtype=np.float32)
    return np.concatenate(out).astype(np.float32, copy=False)
