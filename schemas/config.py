"""The run-config schema (`plabel run CONFIG.yaml`), validated with errors naming key and value.

Every section is a dataclass; unknown keys, wrong types and out-of-range values raise
:class:`ConfigError` with the dotted key path, e.g. ``label.sam.batch_size: expected int > 0, got 'x'``.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

SAM_BACKENDS = ("lite_medsam", "vit_h", "vit_l", "vit_b", "medsam", "mobile_sam", "random_tiny")
# random weights: for plumbing tests and soak runs, never for pseudo labels (plabel.method.sam.backends)
RANDOM_SAM_BACKENDS = ("random_tiny",)
STAGE_PROMPTS = ("box", "points", "mask")
SAM_DEVICES = ("auto", "gpu", "cpu")
AUTOCAST = ("none", "bf16", "fp16")
POLICIES = ("auto", "sam", "unet", "drop")  # the quality gate's per-class policies (plabel.method.gate)
MIN_IMAGE_PIXELS = 64  # plabel.data.imageio.MIN_SIDE ** 2 (schemas stays free of engine imports)
# The paper: stage 1 box; stage 2 positive/negative points plus stage 1's low-res logits.
PAPER_STAGES = (("box",), ("points", "mask"))
# LiteMedSAM was trained with box prompts: measured on JSRT images, adding points in stage 2 drops
# lung Dice from 0.98 to 0.77 and heart from 0.8 to 0.3, while box + stage-1 logits keeps or improves
# stage 1 (lungs 0.97, heart 0.87). Its default therefore re-asks with the box and the logits.
BACKEND_DEFAULT_STAGES = {"lite_medsam": (("box",), ("box", "mask"))}


class ConfigError(ValueError):
    """A config key has a bad value; the message names the key path and the value."""


@dataclass
class DataConfig:
    source: str | None = None  # raw dataset dir: images/, masks/<class>/, classes.json
    shards: str | None = None  # or an already ingested directory holding manifest.json
    labelled: int = 10  # labelled training images (teacher)
    val: int = 5  # labelled validation images (model selection, gate calibration)
    test: int = 0  # held-out test images (final Dice table); the rest is unlabelled
    seed: int = 0
    shard_size: int = 64

    def validate(self, path: str) -> None:
        if (self.source is None) == (self.shards is None):
            raise ConfigError(f"{path}: give exactly one of 'source' (raw dataset) or 'shards' (ingested dir)")
        for k in ("labelled", "val", "test"):
            _check(getattr(self, k) >= 0, f"{path}.{k}", getattr(self, k), "int >= 0")
        _check(self.labelled > 0, f"{path}.labelled", self.labelled, "int > 0 (the teacher needs labels)")
        _check(self.shard_size > 0, f"{path}.shard_size", self.shard_size, "int > 0")


@dataclass
class TrainSection:
    image_size: int = 256  # images are resized to image_size x image_size for the U-Net
    base_channels: int = 16
    depth: int = 4
    epochs: int = 40
    batch_size: int = 4
    lr: float = 1e-3
    weight_decay: float = 1e-4
    augment: bool = True
    seed: int = 0
    num_workers: int = 1  # Ray Train workers
    use_gpu: bool = False
    include_labelled: bool = True  # student only: train on pseudo labels plus the labelled images
    # student only: "teacher" starts from the teacher's weights (needs the teacher's base_channels
    # and depth; measured better on JSRT, benchmarks/RESULTS.md), "scratch" from a fresh U-Net
    init: str = "teacher"
    # which epoch is kept (plabel.training.selection): "guarded" (with init: teacher) keeps only epochs whose
    # per-class validation Dice is no more than selection_tolerance below the teacher's, and the
    # teacher's weights if none is; "mean": the best mean validation Dice. Teachers and students
    # from scratch always use the mean.
    selection: str = "guarded"
    selection_tolerance: float = 0.005  # = plabel.training.selection.GUARD_TOLERANCE (tests/test_config.py)
    # student only: strength of distillation from the teacher's soft outputs for the (image, class)
    # pairs without a pseudo label (dropped by the gate); 0 = off (plabel.method.losses.distillation_loss).
    # Measured on JSRT (benchmarks/RESULTS.md): stops the student forgetting the dropped classes;
    # they stay near the teacher (within the training noise, -0.8..+1.8 on the heart).
    distill: float = 1.0
    # student only, with init: teacher: train this many students with seeds seed, seed + 1, ... and
    # keep the average of their weights (plabel.training.soup.average_checkpoints); 1 = one student.
    # The student's default is StudentSection's; a teacher is always one model.
    soup: int = 1

    def validate(self, path: str) -> None:
        for k in ("image_size", "base_channels", "depth", "epochs", "batch_size", "num_workers"):
            _check(getattr(self, k) > 0, f"{path}.{k}", getattr(self, k), "int > 0")
        _check(self.image_size % (2**self.depth) == 0, f"{path}.image_size", self.image_size,
               f"a multiple of 2**depth = {2 ** self.depth}")
        _check(self.lr > 0, f"{path}.lr", self.lr, "float > 0")
        _check(self.init in ("teacher", "scratch"), f"{path}.init", self.init, "teacher or scratch")
        _check(math.isfinite(self.distill) and self.distill >= 0, f"{path}.distill", self.distill, "a number >= 0")
        _check(self.selection in ("guarded", "mean"), f"{path}.selection", self.selection, "guarded or mean")
        _check(isinstance(self.soup, int) and not isinstance(self.soup, bool) and self.soup >= 1, f"{path}.soup",
               self.soup, "an int >= 1")
        _check(self.soup == 1 or self.init == "teacher", f"{path}.soup", self.soup,
               "1 unless init is teacher (students from scratch share no starting weights to average around)")
        _check(math.isfinite(self.selection_tolerance) and 0 <= self.selection_tolerance <= 1,
               f"{path}.selection_tolerance", self.selection_tolerance, "a number in [0, 1]")


# Students a soup averages by default (student.init: teacher). Measured on JSRT (benchmarks/RESULTS.md,
# quality): a single student loses up to 0.8 Dice points on one class against its teacher by
# training noise alone; the average of 3 averages that noise out, at 3 student trainings.
DEFAULT_STUDENT_SOUP = 3


@dataclass
class StudentSection(TrainSection):
    """TrainSection of the student: ``soup`` left unset is DEFAULT_STUDENT_SOUP with init: teacher and
    1 with init: scratch (students from scratch share no starting weights to average around)."""
    soup: int | None = None

    def __post_init__(self) -> None:
        if self.soup is None:
            self.soup = DEFAULT_STUDENT_SOUP if self.init == "teacher" else 1


@dataclass
class CleaningSection:
    threshold: float = 0.5
    opening_radius: int = 0
    closing_radius: int = 0
    fill_holes: bool = False

    def validate(self, path: str) -> None:
        _check(0.0 <= self.threshold < 1.0, f"{path}.threshold", self.threshold, "float in [0, 1)")
        _check(self.opening_radius >= 0, f"{path}.opening_radius", self.opening_radius, "int >= 0")
        _check(self.closing_radius >= 0, f"{path}.closing_radius", self.closing_radius, "int >= 0")


@dataclass
class SamSection:
    backend: str = "lite_medsam"
    checkpoint: str | None = None  # path or http(s) URL (not needed for lite_medsam)
    sha256: str | None = None  # expected SHA-256 of a downloaded checkpoint
    # prompts per refinement stage; None = the backend's default (BACKEND_DEFAULT_STAGES)
    stages: list[list[str]] | None = None
    batch_size: int = 8  # images per image-encoder call
    actors: int = 1  # SAM actor pool size
    # where SAM actors run: auto = on GPUs when the cluster has any when labelling starts;
    # gpu = always ask for GPUs (an autoscaler scaling a GPU group from zero starts nodes); cpu = never
    device: str = "auto"
    num_gpus: float = 1.0  # GPUs per SAM actor when they run on GPUs (fractions share a GPU)
    cpus: float = 1.0  # CPUs per SAM actor when the cluster has no GPU (its torch threads)
    autocast: str = "none"  # none | bf16 | fp16 (GPU only)
    # torch.compile the image encoder and mask decoder in each SAM actor (plabel.method.sam.compile):
    # same float32 maths, ~1.5x faster on CPU, 1-3 min of compilation when an actor starts
    compile: bool = False
    # extra Ray resources per SAM actor, e.g. {"sam_node": 1} to pin SAM to a node group
    resources: dict[str, float] = field(default_factory=dict)
    # host memory (GiB) Ray reserves per SAM actor (its `memory` resource), so that a node runs no
    # more SAM actors than its memory holds; None: no reservation. Peak RSS measured on CPU:
    # LiteMedSAM 2.7 GB (benchmarks/RESULTS.md, refinement speed)
    memory_gb: float | None = None

    def __post_init__(self):
        if self.stages is None:
            self.stages = [list(s) for s in BACKEND_DEFAULT_STAGES.get(self.backend, PAPER_STAGES)]

    def validate(self, path: str) -> None:
        _check(self.backend in SAM_BACKENDS, f"{path}.backend", self.backend, f"one of {SAM_BACKENDS}")
        _check(self.backend not in RANDOM_SAM_BACKENDS or self.checkpoint is None, f"{path}.checkpoint",
               self.checkpoint, f"none for backend {self.backend!r} (random weights)")
        _check(len(self.stages) >= 1, f"{path}.stages", self.stages, "at least one stage")
        for i, stage in enumerate(self.stages):
            _check(len(stage) >= 1, f"{path}.stages[{i}]", stage, "a non-empty list of prompts")
            for p in stage:
                _check(p in STAGE_PROMPTS, f"{path}.stages[{i}]", p, f"prompts from {STAGE_PROMPTS}")
            _check(i > 0 or "mask" not in stage, f"{path}.stages[0]", stage,
                   "no 'mask' prompt (there is no earlier stage)")
        _check(self.batch_size > 0, f"{path}.batch_size", self.batch_size, "int > 0")
        _check(self.actors > 0, f"{path}.actors", self.actors, "int > 0")
        _check(0 < self.num_gpus <= 8, f"{path}.num_gpus", self.num_gpus, "float in (0, 8]")
        _check(self.cpus > 0, f"{path}.cpus", self.cpus, "float > 0")
        _check(self.autocast in AUTOCAST, f"{path}.autocast", self.autocast, f"one of {AUTOCAST}")
        _check(isinstance(self.compile, bool), f"{path}.compile", self.compile, "true or false")
        _check(self.device in SAM_DEVICES, f"{path}.device", self.device, f"one of {SAM_DEVICES}")
        if self.memory_gb is not None:
            _check(math.isfinite(self.memory_gb) and self.memory_gb > 0, f"{path}.memory_gb", self.memory_gb,
                   "a number of GiB > 0, or null (no reservation)")
        for k, v in self.resources.items():
            _check(k not in ("CPU", "GPU", "memory"), f"{path}.resources", k,
                   "custom resource names (CPU and GPU come from cpus / num_gpus, memory from memory_gb)")
            _check(isinstance(v, (int, float)) and v > 0, f"{path}.resources.{k}", v, "a number > 0")


@dataclass
class GateSection:
    policy: str = "auto"  # auto | sam | unet | drop
    min_sam_iou: float = 0.5
    min_agreement: float = 0.6
    min_agreement_unet: float = 0.3
    per_class: dict[str, dict] = field(default_factory=dict)  # class -> overrides of the keys above
    # `plabel run`: choose each class's gate on the validation split (plabel.method.calibration) before
    # labelling; classes listed in per_class keep their configured gate
    calibrate: bool = True
    drop_floor: float = 0.5  # calibration: lowest Dice a dropped image scores (break-even Dice)
    drop_margin: float = 0.0  # calibration: break-even = max(drop_floor, teacher's Dice - drop_margin)
    min_images: int = 3  # calibration: validation images the teacher must find a class on
    # calibration: when keeping the cleaned U-Net mask ties with dropping the class (it scores the
    # teacher's own Dice), drop it (measured better for the student) or keep it: drop | unet
    prefer_on_tie: str = "drop"
    # calibration: a dropped image scores its own teacher Dice (image) or the class's mean (mean)
    break_even: str = "image"
    # calibration: a sam / auto gate must keep SAM's mask on at least this share of the class's
    # validation images (0 = no rule; plabel.method.calibration.CalibrationObjective.min_sam_share)
    min_sam_share: float = 0.0
    # calibration: keep a sam / auto gate only if it survives leave-one-out over the validation
    # images (plabel.method.calibration.choose_gate); measured on JSRT, benchmarks/RESULTS.md
    cross_validate: bool = True

    GATE_KEYS = ("policy", "min_sam_iou", "min_agreement", "min_agreement_unet")

    def validate(self, path: str) -> None:
        _check(self.policy in POLICIES, f"{path}.policy", self.policy, f"one of {POLICIES}")
        for k in ("min_sam_iou", "min_agreement", "min_agreement_unet"):
            _check(math.isfinite(getattr(self, k)), f"{path}.{k}", getattr(self, k), "a finite number")
        allowed = set(self.GATE_KEYS)
        for cls, over in self.per_class.items():
            _check(isinstance(over, dict), f"{path}.per_class.{cls}", over, "a mapping")
            for k, v in over.items():
                _check(k in allowed, f"{path}.per_class.{cls}", k, f"keys from {sorted(allowed)}")
                if k == "policy":
                    _check(v in POLICIES, f"{path}.per_class.{cls}.policy", v, f"one of {POLICIES}")
                else:
                    _check(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
                           f"{path}.per_class.{cls}.{k}", v, "a finite number")
        _check(0.0 <= self.drop_floor <= 1.0, f"{path}.drop_floor", self.drop_floor, "a number in [0, 1]")
        _check(-1.0 <= self.drop_margin <= 1.0, f"{path}.drop_margin", self.drop_margin, "a number in [-1, 1]")
        _check(self.min_images >= 1, f"{path}.min_images", self.min_images, "int >= 1")
        _check(self.prefer_on_tie in ("drop", "unet"), f"{path}.prefer_on_tie", self.prefer_on_tie, "drop or unet")
        _check(self.break_even in ("image", "mean"), f"{path}.break_even", self.break_even, "image or mean")
        _check(isinstance(self.min_sam_share, (int, float)) and 0.0 <= self.min_sam_share <= 1.0,
               f"{path}.min_sam_share", self.min_sam_share, "a number in [0, 1]")
        _check(isinstance(self.cross_validate, bool), f"{path}.cross_validate", self.cross_validate, "true or false")

    def to_gate_dict(self) -> dict:
        """plabel.method.gate.GateConfig dict: the default gate, and per class the default with its overrides."""
        default = {k: getattr(self, k) for k in self.GATE_KEYS}
        return {"default": default, "per_class": {c: {**default, **o} for c, o in self.per_class.items()}}

    def with_calibrated(self, per_class: dict[str, dict]) -> "GateSection":
        """A copy whose per-class gates are ``per_class`` (class -> gate dict, e.g. the calibrated
        plabel.method.gate.ClassGate dicts), except for the classes this section's per_class lists: their
        configured overrides win."""
        calibrated = {c: {k: g[k] for k in self.GATE_KEYS if k in g} for c, g in per_class.items()}
        return dataclasses.replace(self, per_class={**calibrated, **self.per_class})


@dataclass
class LabelSection:
    cleaning: CleaningSection = field(default_factory=CleaningSection)
    sam: SamSection = field(default_factory=SamSection)
    gate: GateSection = field(default_factory=GateSection)
    unet_actors: int = 1  # U-Net + cleaning actor pool size (CPU)
    unet_batch_size: int = 8
    # images with more pixels (H * W) become error rows before they are decoded (header check)
    max_image_pixels: int = 64_000_000

    def validate(self, path: str) -> None:
        _check(self.unet_actors > 0, f"{path}.unet_actors", self.unet_actors, "int > 0")
        _check(self.unet_batch_size > 0, f"{path}.unet_batch_size", self.unet_batch_size, "int > 0")
        _check(self.max_image_pixels >= MIN_IMAGE_PIXELS, f"{path}.max_image_pixels", self.max_image_pixels,
               f"int >= {MIN_IMAGE_PIXELS} (the smallest image plabel accepts is 8x8)")


@dataclass
class RaySection:
    address: str | None = None  # existing cluster ("auto", "ray://..."); None starts a local one
    num_cpus: int | None = None  # logical CPUs of the local Ray (default: max(4, cores))
    dashboard: bool = False

    def validate(self, path: str) -> None:
        if self.num_cpus is not None:
            _check(self.num_cpus > 0, f"{path}.num_cpus", self.num_cpus, "int > 0")


@dataclass
class RunConfig:
    name: str = "run"
    run_dir: str = "runs"  # the run writes <run_dir>/<name>/
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TrainSection = field(default_factory=TrainSection)
    label: LabelSection = field(default_factory=LabelSection)
    student: StudentSection = field(default_factory=StudentSection)
    ray: RaySection = field(default_factory=RaySection)

    def validate(self, path: str = "") -> None:
        _check(bool(self.name) and "/" not in self.name, "name", self.name, "a non-empty name without '/'")
        s, t = self.student, self.teacher
        if s.init == "teacher" and (s.base_channels, s.depth) != (t.base_channels, t.depth):
            raise ConfigError(
                f"student.init: 'teacher' starts the student from the teacher's weights, so student.base_channels "
                f"and student.depth must equal the teacher's: got {s.base_channels} / {s.depth}, teacher "
                f"{t.base_channels} / {t.depth}; match them or set student.init: scratch")
        _check(t.soup == 1, "teacher.soup", t.soup, "1 (an average of several models is a student option)")

    def to_dict(self) -> dict:
        return asdict(self)


def _check(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: expected {expected}, got {value!r}")


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, key)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {str(k): v for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def build(cls: type, data: Any, path: str = ""):
    """Instantiate dataclass ``cls`` from a mapping, validating keys, types and values."""
    where = path or "config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for k in data:
        if k not in names:
            raise ConfigError(f"{path + '.' if path else ''}{k}: unknown key; expected one of {names}")
    kwargs = {k: _convert(hints[k], v, f"{path + '.' if path else ''}{k}") for k, v in data.items()}
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        obj.validate(path)
    return obj


def load_run_config(path: str | Path, overrides: dict | None = None) -> RunConfig:
    """Read and validate a YAML run config; relative data paths resolve against the config's folder."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if overrides:
        raw = {**raw, **overrides}
    cfg = build(RunConfig, raw)
    for attr in ("source", "shards"):
        v = getattr(cfg.data, attr)
        if v is not None and "://" not in v and not Path(v).is_absolute():
            setattr(cfg.data, attr, str((path.parent / v).resolve()))
    if "://" not in cfg.run_dir and not Path(cfg.run_dir).is_absolute():
        cfg.run_dir = str((path.parent / cfg.run_dir).resolve())
    return cfg
