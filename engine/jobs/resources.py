"""The Ray resources each part of a plabel run asks for, computed from the run config alone.

One place for "what does a SAM actor need", used by the jobs when they schedule actors and by
the deployment tests when they check that every request fits a worker group of the cluster.
A request is a dict in Ray's resource names: {"CPU": 1.0, "GPU": 0.5, "memory": bytes, "<custom>": 1.0}.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from plabel.schemas.config import COMPILE_MIN_IMAGES_PER_ACTOR  # the measured threshold, with the config's doc

DECODE_CPUS = 0.5  # one image-decoding task of the label job
GIB = 2**30  # bytes: Ray's `memory` resource is counted in bytes
AUTO = "auto"


@dataclass(frozen=True)
class Request:
    """`count` identical Ray tasks/actors, each asking for `resources`."""

    stage: str
    count: int
    resources: dict[str, float]


def sam_on_gpu(sam, cluster_has_gpu: bool) -> bool:
    """sam.device gpu: always; cpu: never; auto: when the cluster has GPUs as labelling starts."""
    return sam.device == "gpu" or (sam.device == "auto" and cluster_has_gpu)


def refine_resources(sam, cluster_has_gpu: bool) -> dict[str, float]:
    """One SAM actor: sam.num_gpus GPUs when on GPU, else sam.cpus CPUs; sam.memory_gb GiB of
    memory (bytes, Ray's `memory` resource) when set; plus sam.resources."""
    base = {"GPU": float(sam.num_gpus)} if sam_on_gpu(sam, cluster_has_gpu) else {"CPU": float(sam.cpus)}
    if sam.memory_gb is not None:
        base["memory"] = float(round(sam.memory_gb * GIB))
    return {**base, **{k: float(v) for k, v in sam.resources.items()}}


def ray_remote_args(resources: dict[str, float]) -> dict:
    """Ray's keyword form of a request: num_cpus / num_gpus / memory (bytes) / resources={custom}."""
    args: dict = {}
    custom = {k: v for k, v in resources.items() if k not in ("CPU", "GPU", "memory")}
    if "CPU" in resources:
        args["num_cpus"] = resources["CPU"]
    if "GPU" in resources:
        args["num_gpus"] = resources["GPU"]
    if "memory" in resources:
        args["memory"] = resources["memory"]
    if custom:
        args["resources"] = custom
    return args


@dataclass(frozen=True)
class LabelPlan:
    """What the label job runs SAM with: the actor count and compilation, resolved from
    ``label.sam.actors`` / ``label.sam.compile`` (``auto`` or a value) by :func:`plan_label`."""

    sam_actors: int
    compile: bool
    sam_on_gpu: bool
    why: str  # one line for people: how `auto` was resolved

    def as_dict(self) -> dict:
        return {"sam_actors": self.sam_actors, "sam_compile": self.compile, "sam_on_gpu": self.sam_on_gpu,
                "plan": self.why}


NO_SAM = "SAM not run: the gate consults it for no class (every policy drop or unet)"


def plan_label(label, cluster_cpus: float, cluster_gpus: float, images: int | None,
               needs_sam: bool = True) -> LabelPlan:
    """Resolve ``label.sam.actors`` and ``label.sam.compile`` for a cluster and a job size.

    label:        the LabelSection; explicit values are kept as they are.
    cluster_cpus: logical CPUs of the cluster (Ray's ``CPU``); cluster_gpus: its GPUs.
    images:       images the job will label (None when unknown).

    actors ``auto``: on GPUs, one actor per ``sam.num_gpus`` GPUs the cluster has; on CPUs, one actor of
    ``sam.cpus`` CPUs for every CPU left after the U-Net actors and a decoding task (the measured
    recipe: one single-thread actor per core, benchmarks/RESULTS.md, speed). Never more actors than
    batches of ``sam.batch_size`` images, never fewer than one.
    compile ``auto``: on CPU when every actor refines at least COMPILE_MIN_IMAGES_PER_ACTOR images;
    off on GPU (not measured there yet: set it explicitly).
    needs_sam False (the gate consults SAM for no class): one 1-CPU actor gates and writes the rows,
    SAM is not loaded.
    """
    if not needs_sam:
        return LabelPlan(1, False, False, NO_SAM)
    sam = label.sam
    on_gpu = sam_on_gpu(sam, cluster_gpus > 0)
    notes = []
    if sam.actors == AUTO:
        if on_gpu:
            actors = max(1, math.floor(cluster_gpus / sam.num_gpus + 1e-9))
            notes.append(f"{actors} SAM actor(s): {cluster_gpus:g} GPU(s) / {sam.num_gpus:g} per actor")
        else:
            free = cluster_cpus - label.unet_actors - DECODE_CPUS
            actors = max(1, math.floor(free / sam.cpus + 1e-9))
            notes.append(f"{actors} SAM actor(s) of {sam.cpus:g} CPU: {cluster_cpus:g} CPUs less "
                         f"{label.unet_actors} U-Net actor(s) and decoding")
        batches = None if images is None else max(1, math.ceil(images / sam.batch_size))
        if batches is not None and actors > batches:
            actors = batches
            notes[-1] += f", capped at {actors} for {images} images in batches of {sam.batch_size}"
    else:
        actors = int(sam.actors)
    if sam.compile == AUTO:
        per_actor = None if images is None else images / actors
        compile_ = (not on_gpu) and per_actor is not None and per_actor >= COMPILE_MIN_IMAGES_PER_ACTOR
        if on_gpu:
            notes.append("not compiled (auto: GPU)")
        elif per_actor is None:
            notes.append("not compiled (auto: job size unknown)")
        else:
            notes.append(f"{'compiled' if compile_ else 'not compiled'} (auto: {per_actor:.0f} images per actor, "
                         f"compiling pays from {COMPILE_MIN_IMAGES_PER_ACTOR})")
    else:
        compile_ = bool(sam.compile)
    why = "; ".join(notes) if notes else "as configured"
    return LabelPlan(actors, compile_, on_gpu, why)


def label_requests(label, cluster_has_gpu: bool, sam_actors: int | None = None,
                   needs_sam: bool = True) -> list[Request]:
    """Requests of the label job: decode tasks, the U-Net/cleaning actor pool, the SAM actor pool
    (``sam_actors`` as planned; by default label.sam.actors, and one actor for ``auto``: the least
    the cluster must hold; needs_sam False: one 1-CPU actor that gates without SAM)."""
    if sam_actors is None:
        sam_actors = 1 if label.sam.actors == AUTO else int(label.sam.actors)
    refine = Request("refine", sam_actors, refine_resources(label.sam, cluster_has_gpu)) if needs_sam else \
        Request("refine", 1, {"CPU": 1.0})
    return [
        Request("decode", 1, {"CPU": DECODE_CPUS}),
        Request("teacher", label.unet_actors, {"CPU": 1.0}),
        refine,
    ]


def train_threads(threads: int | None, node_cpus: float, cores: int, local_workers: int) -> int:
    """torch threads of one Ray Train worker: ``threads`` (the section's) if set; else the CPUs Ray
    counts on the worker's node (``node_cpus``), at most the ``cores`` the process may run on (a pod's
    Ray count is its CPU limit; a loopback Ray may count more than the machine has), shared among the
    ``local_workers`` Train workers of that node; at least 1. Ray itself would set OMP_NUM_THREADS to
    the worker's one reserved CPU, which leaves half of a 2-core machine idle."""
    if threads:
        return int(threads)
    return max(1, int(min(node_cpus, cores)) // max(1, local_workers))


def train_requests(section, stage: str) -> list[Request]:
    """Requests of a Ray Train fit: num_workers workers of 1 CPU (+1 GPU with use_gpu)."""
    worker = {"CPU": 1.0, **({"GPU": 1.0} if section.use_gpu else {})}
    return [Request(stage, section.num_workers, worker)]


def run_requests(cfg, cluster_has_gpu: bool) -> list[Request]:
    """Every request of `plabel run` with this config, stage by stage."""
    return [*train_requests(cfg.teacher, "teacher_train"), *label_requests(cfg.label, cluster_has_gpu),
            *train_requests(cfg.student, "student_train")]
