"""The run-config schema (`plabel run CONFIG.yaml`), declared once as pydantic models.

Each section is a strict pydantic model: unknown keys, wrong types (no bool for an int, no string
for a number; an int is accepted for a float) and out-of-range values raise :class:`ConfigError`
with the dotted key path and the value, e.g. ``label.sam.batch_size: expected int > 0, got 0``.
Every field carries its description; :func:`config_reference_markdown` renders them as the
reference tables of docs/config.md (``python -m plabel.schemas.config --write docs/config.md``).

This module imports nothing of plabel outside plabel.schemas (pydantic, yaml and the stdlib only).
"""
import argparse
import math
import re
import sys
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Callable, ClassVar, Optional

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError, core_schema

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
# label.sam.compile: auto compiles SAM on CPU when every SAM actor refines at least this many images
# (plabel.jobs.resources.plan_label). Measured (2-core AMD EPYC, LiteMedSAM, one thread per actor,
# batches of 8; benchmarks/RESULTS.md, speed): compiling costs each actor about 35 s with a warm
# inductor cache and 80 s cold, and saves 1.6-2.7 s per image, so it pays from about 30-50 images.
COMPILE_MIN_IMAGES_PER_ACTOR = 48
# the keys of one gate (plabel.method.gate.ClassGate); label.gate.per_class overrides these only
GATE_KEYS = ("policy", "min_sam_iou", "min_agreement", "min_agreement_unet")


class ConfigError(ValueError):
    """A config key has a bad value; the message names the key path and the value."""


# ----------------------------------------------------------------------------- rules
# A rule's failure is a PydanticCustomError whose context holds the key below the failing location
# ("sub", a tuple of key parts), the value and the expected text; _message turns it into
# "KEY: expected EXPECTED, got VALUE".


def _bad(sub: tuple, value: Any, expected: str) -> PydanticCustomError:
    return PydanticCustomError("plabel_value", "expected {expected}, got {value}",
                               {"sub": tuple(sub), "expected": expected, "value": repr(value)})


def _said(sub: tuple, message: str) -> PydanticCustomError:
    return PydanticCustomError("plabel_message", "{message}", {"sub": tuple(sub), "message": message})


class Rule:
    """Field metadata (``Annotated[int, Rule(...)]``) that validates a value after its type check.

    ``validate(value)`` raises a _bad / _said error (None is never checked: null is the type's
    business); ``doc`` is the field's type in the reference tables."""

    def __init__(self, validate: Callable[[Any], None], doc: str):
        self.validate, self.doc = validate, doc

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(self, handler(source))

    def __call__(self, value: Any) -> Any:
        if value is not None:
            self.validate(value)
        return value


def check(ok: Callable[[Any], bool], expected: str, doc: str | None = None) -> Rule:
    """A rule from a predicate; ``expected`` completes the error message, ``doc`` (default: expected
    without its article and its parenthesis) is the type column of the reference."""

    def validate(value: Any) -> None:
        if not ok(value):
            raise _bad((), value, expected)

    if doc is None:
        doc = re.sub(r"^(an?) ", "", re.sub(r" \(.*\)$", "", expected))
    return Rule(validate, doc)


def one_of(values: tuple, expected: str | None = None) -> Rule:
    """A string among ``values``; the message says ``expected`` (default: 'one of (values)')."""
    return check(lambda v: v in values, expected or f"one of {values}", "one of " + ", ".join(f"`{v}`" for v in values))


def _finite(v: float) -> bool:
    return math.isfinite(v)


def _str_keys(value: Any) -> Any:
    """Mapping keys as strings (YAML may give ints), like the hand-written converter did."""
    return {str(k): v for k, v in value.items()} if isinstance(value, dict) else value


PositiveInt = Annotated[int, check(lambda v: v > 0, "int > 0")]
NonNegativeInt = Annotated[int, check(lambda v: v >= 0, "int >= 0")]
Fraction = Annotated[float, check(lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]")]
FiniteNumber = Annotated[float, check(_finite, "a finite number")]
StrKeys = BeforeValidator(_str_keys)


def _field(default: Any = None, description: str = "", *, default_doc: str | None = None,
           default_factory: Callable[[], Any] | None = None) -> Any:
    """A config key: its default and its description (the reference table's row)."""
    extra = {"json_schema_extra": {"default_doc": default_doc}} if default_doc else {}
    if default_factory is not None:
        return Field(default_factory=default_factory, description=description, **extra)
    return Field(default, description=description, **extra)


class _Section(BaseModel):
    """A config section: strict types, no unknown keys, null = all defaults; rules after the types.
    build() reports errors as ConfigError; constructing a section directly raises pydantic's
    ValidationError (a ValueError too)."""

    model_config = ConfigDict(strict=True, extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _null_is_empty(cls, data: Any) -> Any:
        return {} if data is None else data

    @model_validator(mode="after")
    def _after_fields(self) -> "_Section":
        self._fill()
        self._rules()
        return self

    def _fill(self) -> None:
        """Defaults that depend on other keys."""

    def _rules(self) -> None:
        """Rules across keys: raise _bad / _said with the key."""


# ----------------------------------------------------------------------------- sections


class DataConfig(_Section):
    """The dataset and its split. Give exactly one of `source` and `shards`."""

    source: Optional[str] = _field(
        None, "raw dataset folder (`images/`, `masks/<class>/`, `classes.json`), ingested into the run; a local "
              "folder")
    shards: Optional[str] = _field(None, "or an already ingested folder holding `manifest.json` (local path or URI)")
    labelled: Annotated[int, check(lambda v: v > 0, "int > 0 (the teacher needs labels)")] = _field(
        10, "labelled training images (the teacher's)")
    val: NonNegativeInt = _field(5, "labelled validation images (model selection, gate calibration)")
    test: NonNegativeInt = _field(0, "held-out test images (the final Dice table); all other images are unlabelled")
    seed: int = _field(0, "seed of the split")
    shard_size: PositiveInt = _field(64, "images per tar shard")

    def _rules(self) -> None:
        if (self.source is None) == (self.shards is None):
            raise _said((), "give exactly one of 'source' (raw dataset) or 'shards' (ingested dir)")


class TrainSection(_Section):
    """U-Net training of the teacher and of the student; keys marked *student only* do nothing for
    the teacher."""

    image_size: PositiveInt = _field(
        256, "images are resized to image_size x image_size for the U-Net; a multiple of 2**depth")
    intensity: Annotated[str, one_of(("fixed", "minmax"), "fixed or minmax")] = _field(
        "minmax",
        "how each image's gray levels reach the U-Net (plabel.method.preprocess.normalise_intensity), recorded in "
        "its checkpoint so that label, predict and evaluate apply the same; SAM is given the same gray levels as "
        "the teacher. `minmax`: each image's darkest level to 0 and its brightest to 1; `fixed`: gray / 255 (older "
        "checkpoints). The student's must equal the teacher's. Why minmax (benchmarks/RESULTS.md, quality 2.0b): 5 of "
        "JSRT's 200 radiographs are washed out (levels 239-254) and every U-Net read at gray / 255, full "
        "supervision included, predicted nothing on them; on three splits at n = 10 minmax raised the sixth "
        "round's student from 87.00 to 88.74 (full supervision 92.43 -> 93.01)")
    base_channels: PositiveInt = _field(16, "channels of the U-Net's first level (level i has base_channels * 2**i)")
    depth: PositiveInt = _field(4, "number of 2x down-samplings of the U-Net")
    epochs: PositiveInt = _field(
        40, "training epochs (the best-validation epoch is kept). A teacher on a few labelled images needs many: on "
            "JSRT with 10 images its test Dice rose up to 640 epochs (benchmarks/RESULTS.md, quality 2.0: 80.36 after "
            "80, 89.14 after 320, 90.00 after 640)")
    batch_size: PositiveInt = _field(4, "training images per step and Ray Train worker")
    lr: Annotated[float, check(lambda v: v > 0, "float > 0", "number > 0")] = _field(1e-3, "learning rate")
    weight_decay: float = _field(1e-4, "weight decay of the optimiser")
    augment: bool = _field(True, "augment the training images")
    elastic: Annotated[float, check(lambda v: math.isfinite(v) and 0 <= v < 0.25, "a number in [0, 0.25)")] = _field(
        0.0, "with `augment`: a smooth random elastic warp of each training image and its masks before the random "
             "affine (plabel.method.augment.sample_elastic; one resampling): the largest displacement as a fraction "
             "of the image side (0.03: about 4 px at 128 px); 0: none")
    seed: int = _field(
        0, "training seed: initial weights, augmentation and the order of the training images (with one worker, "
           "the same seed, data and settings give the same weights)")
    precision: Annotated[str, one_of(("auto", "fp32", "bf16"), "auto, fp32 or bf16")] = _field(
        "fp32",
        "precision of the training steps' forward passes (plabel.training.precision): `bf16` autocast, `fp32`, or "
        "`auto` (bf16 on CPUs with AVX-512 BF16 / AMX and on GPUs that support it, else fp32). Weights, optimiser, "
        "loss and validation stay fp32. Measured on JSRT at 256 px (benchmarks/RESULTS.md, section 10): bf16 "
        "epochs 1.3x faster (1.6-2.1x with `channels_last`), but both bf16 teachers scored 2-6 points lower")
    channels_last: bool = _field(
        True, "train with channels_last (NHWC) activations and weights: the same maths (one step's loss equal to "
              "1e-5), 1.1-1.4x faster epochs on the CPU measured (benchmarks/RESULTS.md, section 10); `false`: NCHW")
    num_workers: PositiveInt = _field(1, "Ray Train workers")
    checkpoint_every_s: Annotated[float, check(lambda v: math.isfinite(v) and v >= 0, "a number >= 0")] = _field(
        30.0, "seconds of training between Ray Train checkpoints (a rerun resumes from the last one). The first and "
              "the last epoch always end with one. Each costs up to 2 s of waiting: Ray Train's controller collects "
              "a report every 2 s, so a checkpoint after every epoch (`0`) cost the 80 short epochs of the JSRT "
              "teacher 176 s against 23 s in process (benchmarks/RESULTS.md, section 1)")
    threads: Annotated[Optional[int], check(lambda v: v >= 1, "an int >= 1")] = _field(
        None, "torch threads of each Ray Train worker (Ray reserves 1 CPU per worker either way). Unset: the CPUs "
              "Ray counts on the worker's node, at most the cores the worker may run on, shared among that node's "
              "workers (2 on a 2-core machine; Ray alone would leave torch 1 thread). On JSRT (benchmarks/RESULTS.md, "
              "section 1) one 20-epoch student took 144-171 s with 2 threads, 304-320 s per soup member with 1 in the run "
              "before (two runs, not a one-run ratio)")
    use_gpu: bool = _field(False, "give each Ray Train worker a GPU")
    include_labelled: bool = _field(True, "student only: train on the pseudo labels plus the labelled split")
    init: Annotated[str, one_of(("teacher", "scratch"), "teacher or scratch")] = _field(
        "teacher",
        "student only. `teacher`: the student starts from the teacher's weights (needs the teacher's `base_channels` "
        "and `depth`; a config where they differ is refused); `scratch`: a fresh U-Net, as in the paper. Measured on "
        "JSRT (benchmarks/RESULTS.md, quality), warm start with the calibrated gate beats the teacher where a fresh "
        "student does not; use a lower student `lr` than the teacher's (benchmarks/jsrt_n10.yaml: 0.0005 after the "
        "teacher's 0.002)")
    selection: Annotated[str, one_of(("guarded", "mean"), "guarded or mean")] = _field(
        "guarded",
        "which epoch is kept (plabel.training.selection). `guarded` (students with `init: teacher`): the teacher's "
        "weights are measured on the validation images before the first epoch; an epoch is kept only if no class's "
        "validation Dice is more than `selection_tolerance` below the teacher's, and the teacher's weights come back "
        "(`best_epoch` -1) if every epoch lost a class. `mean`: the epoch with the best mean validation Dice "
        "(teachers and students from scratch always use it). The same guard applies to the average of "
        "`student.soup`")
    selection_tolerance: Annotated[float, check(lambda v: math.isfinite(v) and 0 <= v <= 1, "a number in [0, 1]")] \
        = _field(0.005, "the tolerance of `selection: guarded` (= plabel.training.selection.GUARD_TOLERANCE)")
    distill: Annotated[float, check(lambda v: math.isfinite(v) and v >= 0, "a number >= 0")] = _field(
        1.0,
        "student only: strength of distillation from the teacher (plabel.method.losses.distillation_loss): for every "
        "(image, class) pair without a pseudo label (the gate dropped it), the student's logits are trained towards "
        "the teacher's probabilities on the same augmented image; 0 turns it off. Measured on JSRT "
        "(benchmarks/RESULTS.md, quality): without it a warm-started student forgets the dropped classes in its "
        "first epochs and can end below the teacher on one (seed 1: right clavicle -2.5); with it the dropped "
        "classes stay near the teacher, but the heart still moves between -0.8 and +1.8 with the student's training "
        "seed alone (9 students measured; see `student.soup`)")
    soup: Annotated[int, check(lambda v: v >= 1, "an int >= 1")] = _field(
        1, "student only (see `student.soup`); a teacher is one model: `teacher.soup` must be 1")

    def _rules(self) -> None:
        if self.image_size % (2**self.depth):
            raise _bad(("image_size",), self.image_size, f"a multiple of 2**depth = {2 ** self.depth}")
        if self.soup != 1 and self.init != "teacher":
            raise _bad(("soup",), self.soup,
                       "1 unless init is teacher (students from scratch share no starting weights to average around)")


class StudentSection(TrainSection):
    """TrainSection of the student, with the student's defaults: one student, one round."""

    soup: Annotated[int, check(lambda v: v >= 1, "an int >= 1")] = _field(
        1,
        "train this many students, with seeds `seed`, `seed + 1`, ..., and keep the average of their weights as "
        "`student.pt` (one U-Net at inference; `student-0.pt`, ... stay in the run directory, and a rerun reuses "
        "the members that finished; plabel.training.soup.average_checkpoints). The average is scored on the "
        "validation split (`results.json`: `student.soup_val_dice`, beside each member's best validation Dice). "
        "With `selection: guarded` the average is held to the same rule as an epoch: if it is more than "
        "`selection_tolerance` below the teacher's validation Dice on any class, `student.pt` is the member with "
        "the best validation Dice instead (`results.json`: `student.soup_guard` with the teacher's per-class "
        "validation Dice, the lost classes and what was kept). Costs that many student trainings per round "
        "(`plabel run` only; `plabel train` trains one model). Why 1 (benchmarks/RESULTS.md, quality 2.0b): with "
        "six rounds on JSRT (n = 10, split 0) one student per round was at or above the soup of 3 in every round, "
        "at a third of the cost, and no class of the last round's single students was below its teacher in any "
        "of three splits; a soup of 3 averages out one student's training noise (-0.80 to +1.81 on the heart, "
        "docs/history.md, quality 2.3), which matters most with `rounds: 1`. Students from scratch share no starting weights to "
        "average around, so `init: scratch` with a soup above 1 is refused")
    rounds: Annotated[int, check(lambda v: v >= 1, "an int >= 1")] = _field(
        1,
        "self-training rounds (`plabel run`): round r > 1 takes round r - 1's student as its teacher, calibrates the "
        "gate for it, labels the unlabelled images again and trains a new student (with `init: teacher`, from its "
        "weights). `student.pt` is the last round's student; round r's files are under `round-r/` and its stages are "
        "named calibrate-r, label-r, student-r; the evaluate stage scores every round. Each round costs a label and "
        "a student stage (a label stage whose gate consults SAM for no class runs without SAM). Why 1, the paper's "
        "(benchmarks/RESULTS.md, quality 2.0; JSRT, n = 10, three splits): from a teacher trained to its plateau "
        "(640 epochs, elastic warps; 90.31) one round gave 90.41, two 90.28, three 90.27. Rounds pay off against an "
        "undertrained teacher (quality 2.0b: from an 80-epoch teacher, 80.36, one round 83.49, six 88.74), but "
        "training that teacher longer did more, for less")



class CleaningSection(_Section):
    """Cleaning of the teacher's probabilities before prompting (plabel.method.cleaning)."""

    threshold: Annotated[float, check(lambda v: 0.0 <= v < 1.0, "float in [0, 1)", "number in [0, 1)")] = _field(
        0.5, "probability threshold before component selection")
    opening_radius: NonNegativeInt = _field(0, "morphological opening after component selection: radius in pixels "
                                               "(0 = off)")
    closing_radius: NonNegativeInt = _field(0, "morphological closing after component selection: radius in pixels "
                                               "(0 = off)")
    fill_holes: bool = _field(False, "fill enclosed holes after component selection")


def _check_stages(stages: list[list[str]]) -> None:
    if len(stages) < 1:
        raise _bad((), stages, "at least one stage")
    for i, stage in enumerate(stages):
        if len(stage) < 1:
            raise _bad((i,), stage, "a non-empty list of prompts")
        for p in stage:
            if p not in STAGE_PROMPTS:
                raise _bad((i,), p, f"prompts from {STAGE_PROMPTS}")
        if i == 0 and "mask" in stage:
            raise _bad((0,), stage, "no 'mask' prompt (there is no earlier stage)")


def _check_resources(resources: dict[str, float]) -> None:
    for k, v in resources.items():
        if k in ("CPU", "GPU", "memory"):
            raise _bad((), k, "custom resource names (CPU and GPU come from cpus / num_gpus, memory from memory_gb)")
        if not v > 0:
            raise _bad((k,), v, "a number > 0")


class SamSection(_Section):
    """SAM refinement of the cleaned teacher masks (plabel.method.sam)."""

    backend: Annotated[str, one_of(SAM_BACKENDS)] = _field(
        "lite_medsam", "SAM model; `random_tiny` has random weights, for tests and soak runs, not for pseudo labels")
    checkpoint: Optional[str] = _field(
        None, "checkpoint path or http(s) URL (not needed for `lite_medsam`; none for `random_tiny`)")
    sha256: Optional[str] = _field(None, "expected SHA-256 of a downloaded checkpoint")
    stages: Annotated[Optional[list[list[str]]], Rule(_check_stages, "list of stages, each a list of prompts from "
                                                                     "`box`, `points`, `mask`")] = _field(
        None,
        "prompts of each refinement stage (`mask` = the previous stage's logits, so not in the first). Default: the "
        "paper's `[[box], [points, mask]]`; for `lite_medsam` `[[box], [box, mask]]`, because LiteMedSAM (trained "
        "with boxes) degrades with point prompts (JSRT: lungs 0.98 -> 0.77, heart 0.8 -> 0.3 Dice)",
        default_doc="the backend's")
    batch_size: PositiveInt = _field(8, "images per image-encoder call")
    actors: Annotated[Any, check(lambda v: v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v > 0),
                                 "`auto` or an int > 0", "`auto` or int > 0")] = _field(
        "auto",
        "SAM actor pool size; `auto`: one actor per `num_gpus` GPUs on a GPU cluster, else one actor of `cpus` CPUs per "
        "CPU left after the U-Net actors (the measured CPU recipe: one single-thread actor per core), never more than "
        "the job's batches (plabel.jobs.resources.plan_label)")
    device: Annotated[str, one_of(SAM_DEVICES)] = _field(
        "auto",
        "where SAM actors run: `auto` = on GPUs when the cluster has any when labelling starts, `gpu` = always "
        "request `num_gpus` (use this when an autoscaler scales the GPU group from zero), `cpu` = never")
    num_gpus: Annotated[float, check(lambda v: 0 < v <= 8, "float in (0, 8]", "number in (0, 8]")] = _field(
        1.0, "GPUs per SAM actor when SAM runs on GPUs (fractions share a GPU)")
    cpus: Annotated[float, check(lambda v: v > 0, "float > 0", "number > 0")] = _field(
        1.0, "CPUs per SAM actor (its torch threads) on a cluster without GPUs")
    autocast: Annotated[str, one_of(AUTOCAST)] = _field(
        "none", "SAM precision on GPU (on CPU SAM stays float32: bf16 there moved LiteMedSAM's masks too far, "
                "benchmarks/RESULTS.md, speed)")
    compile: Annotated[Any, check(lambda v: v == "auto" or isinstance(v, bool), "`auto`, true or false",
                                  "`auto` or bool")] = _field(
        "auto",
        "`torch.compile` the image encoder and mask decoder of every SAM actor (plabel.method.sam.compile): same "
        "float32 maths, about 2x faster per image on CPU (benchmarks/RESULTS.md, speed), but each actor spends "
        f"35-80 s compiling when it starts. `auto`: on CPU when every SAM actor refines at least "
        f"{COMPILE_MIN_IMAGES_PER_ACTOR} images; off on GPU")
    resources: Annotated[dict[str, float], StrKeys, Rule(_check_resources, "mapping of resource name to number > 0")] \
        = _field(description="extra Ray resources per SAM actor (e.g. `{sam_node: 1}` to pin SAM to nodes started "
                             "with `--resources '{\"sam_node\": 1}'`)", default_factory=dict)
    memory_gb: Annotated[Optional[float], check(lambda v: math.isfinite(v) and v > 0,
                                                "a number of GiB > 0, or null (no reservation)")] = _field(
        None,
        "host memory (GiB) Ray reserves for each SAM actor (its `memory` resource), so that a node starts no more "
        "SAM actors than its memory holds; null reserves nothing (Ray then packs actors by CPU / GPU alone and warns "
        "when one uses a lot of memory). Peak RSS of a LiteMedSAM actor on CPU: 2.7 GB (benchmarks/RESULTS.md, "
        "speed); the KubeRay config sets 4")

    def _fill(self) -> None:
        if self.stages is None:
            self.stages = [list(s) for s in BACKEND_DEFAULT_STAGES.get(self.backend, PAPER_STAGES)]

    def _rules(self) -> None:
        if self.backend in RANDOM_SAM_BACKENDS and self.checkpoint is not None:
            raise _bad(("checkpoint",), self.checkpoint, f"none for backend {self.backend!r} (random weights)")


def _check_per_class(per_class: dict[str, dict]) -> None:
    allowed = set(GATE_KEYS)
    for cls, over in per_class.items():
        for k, v in over.items():
            if k not in allowed:
                raise _bad((cls,), k, f"keys from {sorted(allowed)}")
            if k == "policy":
                if v not in POLICIES:
                    raise _bad((cls, "policy"), v, f"one of {POLICIES}")
            elif isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise _bad((cls, k), v, "a finite number")


class GateSection(_Section):
    """The quality gate (plabel.method.gate) and its calibration (plabel.method.calibration)."""

    GATE_KEYS: ClassVar[tuple[str, ...]] = GATE_KEYS

    policy: Annotated[str, one_of(POLICIES)] = _field(
        "auto",
        "per class the teacher found: `drop` drops it, `unet` keeps the cleaned U-Net mask, `sam` keeps SAM's mask "
        "if it passes `min_sam_iou` and `min_agreement` (else drops it), `auto` as `sam` but falls back to the U-Net "
        "mask if their agreement is at least `min_agreement_unet` (plabel.method.gate)")
    min_sam_iou: FiniteNumber = _field(0.5, "SAM's predicted IoU needed to keep SAM's mask")
    min_agreement: FiniteNumber = _field(0.6, "Dice between the cleaned U-Net mask and SAM's mask needed to keep "
                                              "SAM's mask")
    min_agreement_unet: FiniteNumber = _field(0.3, "`auto`: the agreement (Dice) needed to keep the U-Net mask when "
                                                   "SAM's is not kept")
    per_class: Annotated[dict[str, dict], StrKeys, Rule(_check_per_class, "mapping of class to gate keys")] = _field(
        description="`{class: {policy: unet, ...}}`: per-class overrides of `policy`, `min_sam_iou`, "
                    "`min_agreement`, `min_agreement_unet`; a class listed here keeps this gate even when the gate "
                    "is calibrated", default_factory=dict)
    calibrate: bool = _field(
        True,
        "`plabel run` calibrates the gate per class on the validation split before labelling (see "
        "[Gate calibration](#gate-calibration)); no effect when `data.val` is 0")
    drop_floor: Annotated[float, check(lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]")] = _field(
        0.5, "calibration: the lowest Dice a dropped image scores (the break-even Dice is max(`drop_floor`, "
             "teacher's Dice - `drop_margin`))")
    drop_margin: Annotated[float, check(lambda v: -1.0 <= v <= 1.0, "a number in [-1, 1]")] = _field(
        0.0, "calibration: break-even Dice = max(`drop_floor`, teacher's Dice - `drop_margin`)")
    min_images: Annotated[int, check(lambda v: v >= 1, "int >= 1")] = _field(
        3, "calibration: a class the teacher finds on fewer validation images keeps its configured gate")
    prefer_on_tie: Annotated[str, one_of(("drop", "unet"), "drop or unet")] = _field(
        "drop",
        "calibration: when keeping the cleaned U-Net masks of a class ties with dropping it (they score the "
        "teacher's own Dice, the break-even), `drop` ignores the class on the unlabelled images, `unet` keeps the "
        "teacher's masks. A pseudo label no better than the teacher's prediction cost students 2-4 Dice points on "
        "JSRT (benchmarks/RESULTS.md), hence `drop`")
    break_even: Annotated[str, one_of(("image", "mean"), "image or mean")] = _field(
        "image",
        "calibration: a dropped image scores max(`drop_floor`, the teacher's Dice on that image - `drop_margin`) "
        "(`image`: a kept mask earns its gain over the teacher's own prediction on that image), or the class's "
        "mean over the validation images (`mean`)")
    min_sam_share: Fraction = _field(
        0.0,
        "calibration: a `sam` / `auto` gate is a candidate only if it keeps SAM's mask on at least this share of the "
        "class's validation images (0 = no rule; plabel.method.calibration.CalibrationObjective.min_sam_share). A "
        "gain measured on the few images that a threshold search picks out does not generalise: JSRT n = 10 seed 2 "
        "kept SAM for a clavicle on 3 of 10 validation images and lost 7 Dice on the unlabelled images "
        "(benchmarks/RESULTS.md)")
    cross_validate: bool = _field(
        True,
        "calibration: a `sam` / `auto` gate is kept only if the whole threshold search, repeated leaving each "
        "validation image out and scored on that image, beats the same choice among `drop` / `unet` alone by "
        "`min_gain`; else the better of `drop` / `unet` (plabel.method.calibration.choose_gate)")

    def to_gate_dict(self) -> dict:
        """plabel.method.gate.GateConfig dict: the default gate, and per class the default with its overrides."""
        default = {k: getattr(self, k) for k in GATE_KEYS}
        return {"default": default, "per_class": {c: {**default, **o} for c, o in self.per_class.items()}}

    def with_calibrated(self, per_class: dict[str, dict]) -> "GateSection":
        """A copy whose per-class gates are ``per_class`` (class -> gate dict, e.g. the calibrated
        plabel.method.gate.ClassGate dicts), except for the classes this section's per_class lists: their
        configured overrides win."""
        calibrated = {c: {k: g[k] for k in GATE_KEYS if k in g} for c, g in per_class.items()}
        return self.model_copy(update={"per_class": {**calibrated, **self.per_class}})


class LabelSection(_Section):
    """The label job: U-Net + cleaning actors, SAM actors and the gate."""

    cleaning: CleaningSection = Field(default_factory=CleaningSection)
    sam: SamSection = Field(default_factory=SamSection)
    gate: GateSection = Field(default_factory=GateSection)
    unet_actors: PositiveInt = _field(1, "U-Net + cleaning actor pool size (CPU)")
    unet_batch_size: PositiveInt = _field(8, "images per U-Net call")
    max_image_pixels: Annotated[int, check(
        lambda v: v >= MIN_IMAGE_PIXELS, f"int >= {MIN_IMAGE_PIXELS} (the smallest image plabel accepts is 8x8)")] \
        = _field(64_000_000,
                 "images with more pixels (height x width, read from the header before decoding) become `error` "
                 "rows naming the image and its size; images under 8 px on a side are error rows too")


class RaySection(_Section):
    """The Ray cluster."""

    address: Optional[str] = _field(None, "an existing cluster (`auto`, `ray://...`); null starts a local Ray on "
                                          "127.0.0.1")
    num_cpus: Annotated[Optional[int], check(lambda v: v > 0, "int > 0")] = _field(
        None, "logical CPUs of the local Ray (null: max(4, cores))")
    dashboard: bool = _field(False, "start the Ray dashboard with the local Ray")


class RunConfig(_Section):
    """The whole run: `plabel run CONFIG.yaml`."""

    name: Annotated[str, check(lambda v: bool(v) and "/" not in v, "a non-empty name without '/'",
                               "non-empty string without `/`")] = _field(
        "run", "the run directory is `<run_dir>/<name>/`")
    run_dir: str = _field("runs", "parent of run directories: a local path or an object-store URI (see "
                                  "[Storage](#storage))")
    # not validated when left out (build(RunConfig, {}) is a valid config for the sections that need no data)
    data: DataConfig = Field(default_factory=lambda: DataConfig.model_construct())
    teacher: TrainSection = Field(default_factory=TrainSection)
    label: LabelSection = Field(default_factory=LabelSection)
    student: StudentSection = Field(default_factory=StudentSection)
    ray: RaySection = Field(default_factory=RaySection)

    def _rules(self) -> None:
        s, t = self.student, self.teacher
        if s.init == "teacher" and (s.base_channels, s.depth) != (t.base_channels, t.depth):
            raise _said(("student", "init"),
                        f"'teacher' starts the student from the teacher's weights, so student.base_channels "
                        f"and student.depth must equal the teacher's: got {s.base_channels} / {s.depth}, teacher "
                        f"{t.base_channels} / {t.depth}; match them or set student.init: scratch")
        if s.intensity != t.intensity:
            raise _said(("student", "intensity"),
                        f"the student learns from the teacher's pseudo labels and soft targets on the same images, so "
                        f"student.intensity must equal teacher.intensity: got {s.intensity}, teacher {t.intensity}")
        if t.soup != 1:
            raise _bad(("teacher", "soup"), t.soup, "1 (an average of several models is a student option)")

    def to_dict(self) -> dict:
        return self.model_dump()


# ----------------------------------------------------------------------------- errors

# pydantic's type errors -> the expected text of "KEY: expected ..., got VALUE"
_TYPE_EXPECTED = {
    "int_type": "an integer", "float_type": "a number", "bool_type": "true or false", "string_type": "a string",
    "list_type": "a list", "dict_type": "a mapping", "model_type": "a mapping", "model_attributes_type": "a mapping",
}


def _key(path: str, loc: tuple) -> str:
    """'label' + ('sam', 'stages', 1) -> 'label.sam.stages[1]'."""
    key = path
    for part in loc:
        key += f"[{part}]" if isinstance(part, int) else (f".{part}" if key else str(part))
    return key


def _model_at(cls: type[BaseModel], loc: tuple) -> type[BaseModel]:
    """The section class at ``loc`` below ``cls``."""
    for part in loc:
        cls = _section_type(cls.model_fields[part].annotation)
    return cls


def _section_type(annotation: Any) -> Any:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _message(cls: type[BaseModel], err: ValidationError, path: str) -> str:
    """One line for the first error of ``err``: unknown keys first (the shallowest), then wrong types,
    then bad values, as the hand-written validator reported them."""
    errors = err.errors(include_url=False)

    def rank(e: dict) -> tuple:
        if e["type"] == "extra_forbidden":
            return 0, len(e["loc"])
        return (1, 0) if e["type"] in _TYPE_EXPECTED else (2, 0)

    e = min(errors, key=rank)
    loc, kind, ctx = tuple(e["loc"]), e["type"], e.get("ctx") or {}
    if kind == "extra_forbidden":
        names = list(_model_at(cls, loc[:-1]).model_fields)
        return f"{_key(path, loc)}: unknown key; expected one of {names}"
    if kind in ("plabel_value", "plabel_message"):
        key = _key(path, loc + tuple(ctx["sub"])) or "config"
        if kind == "plabel_message":
            return f"{key}: {ctx['message']}"
        return f"{key}: expected {ctx['expected']}, got {ctx['value']}"
    key = _key(path, loc) or "config"
    expected = _TYPE_EXPECTED.get(kind)
    if expected:
        return f"{key}: expected {expected}, got {e['input']!r}"
    return f"{key}: {e['msg']}, got {e['input']!r}"


def build(cls: type, data: Any, path: str = ""):
    """Section ``cls`` from a mapping (None: the defaults), validating keys, types and values; errors are
    ConfigError messages whose keys start at ``path`` (e.g. 'label' for a LabelSection)."""
    try:
        return cls.model_validate({} if data is None else data)
    except ValidationError as e:
        raise ConfigError(_message(cls, e, path)) from None


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


# ----------------------------------------------------------------------------- reference (docs/config.md)

BEGIN_MARKER = "<!-- BEGIN config reference: generated by `python -m plabel.schemas.config --write docs/config.md` -->"
END_MARKER = "<!-- END config reference -->"


def _sections(cls: type[BaseModel], prefix: str = "") -> list[tuple[str, type[BaseModel]]]:
    """(dotted path, class) of ``cls`` and its sections, depth first."""
    out = [(prefix, cls)]
    for name, f in cls.model_fields.items():
        sub = _section_type(f.annotation)
        if sub is not None:
            out += _sections(sub, f"{prefix}.{name}" if prefix else name)
    return out


def _strip_optional(annotation: Any) -> tuple[Any, bool]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(annotation))
    return annotation, False


_TYPE_NAMES = {int: "int", float: "number", bool: "bool", str: "string", dict: "mapping", list: "list"}


def _type_doc(f: Any) -> str:
    inner, nullable = _strip_optional(f.annotation)
    rules = [m for m in f.metadata if isinstance(m, Rule)]
    if rules:
        text = rules[-1].doc
    else:
        text = _TYPE_NAMES.get(typing.get_origin(inner) or inner, str(inner))
    if nullable and "null" not in text:
        text += ", or null"
    return text


def _yaml_value(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def _default_doc(f: Any) -> str:
    extra = f.json_schema_extra or {}
    if extra.get("default_doc"):
        return extra["default_doc"]
    value = f.default_factory() if f.default_factory is not None else f.default
    return f"`{_yaml_value(value)}`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _rows(fields: dict) -> list[str]:
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    for name, f in fields.items():
        if _section_type(f.annotation) is None:
            cells = (f"`{name}`", _type_doc(f), _default_doc(f), f.description or "")
            rows.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return rows


def _same_field(f: Any, g: Any) -> bool:
    return g is not None and (f.annotation, f.default, f.description, f.json_schema_extra) == \
        (g.annotation, g.default, g.description, g.json_schema_extra)


def _heading(paths: list[str]) -> str:
    return "### " + (", ".join(f"`{p}`" for p in paths) if paths != [""] else "Top level")


def config_reference_markdown() -> str:
    """The reference tables of docs/config.md, one per section (key, type, default, description), from
    the declaration above: the fields' types, rules, defaults and descriptions."""
    sections = _sections(RunConfig)
    classes = [c for _, c in sections]
    done: set[type] = set()
    out: list[str] = []
    for _, cls in sections:
        if cls in done or any(issubclass(cls, c) and cls is not c for c in classes):
            continue  # a subclass section (student) follows its base class's table
        done.add(cls)
        paths = [p for p, c in sections if c is cls]
        doc = " ".join((cls.__doc__ or "").split())
        out += [_heading(paths), ""] + ([doc, ""] if doc and cls is not RunConfig else []) + _rows(cls.model_fields)
        out.append("")
        for path, sub in sections:  # sections of a subclass: only the keys that differ
            if sub is not cls and issubclass(sub, cls) and sub not in done:
                done.add(sub)
                differ = {n: f for n, f in sub.model_fields.items() if not _same_field(f, cls.model_fields.get(n))}
                out += [_heading([path]), "", f"The keys of {', '.join(f'`{p}`' for p in paths)}, except:", "",
                        *_rows(differ), ""]
    return "\n".join(out).rstrip() + "\n"


def render_docs(text: str) -> str:
    """``text`` (docs/config.md) with the part between the markers replaced by the current reference."""
    start, end = text.find(BEGIN_MARKER), text.find(END_MARKER)
    if start < 0 or end < start:
        raise ValueError(f"the reference markers are missing: {BEGIN_MARKER!r} ... {END_MARKER!r}")
    return text[:start] + BEGIN_MARKER + "\n\n" + config_reference_markdown() + "\n" + text[end:]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m plabel.schemas.config",
                                description="The run-config reference, generated from the declaration.")
    p.add_argument("--markdown", action="store_true", help="print the reference tables")
    p.add_argument("--write", metavar="DOC", help="rewrite the generated part of DOC (docs/config.md)")
    p.add_argument("--check", metavar="DOC", help="exit 1 if the generated part of DOC is out of date")
    args = p.parse_args(argv)
    if args.markdown or not (args.write or args.check):
        sys.stdout.write(config_reference_markdown())
    for doc, write in ((args.write, True), (args.check, False)):
        if doc:
            text = Path(doc).read_text()
            new = render_docs(text)
            if write and new != text:
                Path(doc).write_text(new)
            elif not write and new != text:
                print(f"{doc}: the config reference is out of date; run python -m plabel.schemas.config --write {doc}",
                      file=sys.stderr)
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
