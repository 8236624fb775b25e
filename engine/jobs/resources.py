"""The Ray resources each part of a plabel run asks for, computed from the run config alone.

One place for "what does a SAM actor need", used by the jobs when they schedule actors and by
the deployment tests when they check that every request fits a worker group of the cluster.
A request is a dict in Ray's resource names: {"CPU": 1.0, "GPU": 0.5, "memory": bytes, "<custom>": 1.0}.
"""
from __future__ import annotations

from dataclasses import dataclass

DECODE_CPUS = 0.5  # one image-decoding task of the label job
GIB = 2**30  # bytes: Ray's `memory` resource is counted in bytes


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


def label_requests(label, cluster_has_gpu: bool) -> list[Request]:
    """Requests of the label job: decode tasks, the U-Net/cleaning actor pool, the SAM actor pool."""
    return [
        Request("decode", 1, {"CPU": DECODE_CPUS}),
        Request("teacher", label.unet_actors, {"CPU": 1.0}),
        Request("refine", label.sam.actors, refine_resources(label.sam, cluster_has_gpu)),
    ]


def train_requests(section, stage: str) -> list[Request]:
    """Requests of a Ray Train fit: num_workers workers of 1 CPU (+1 GPU with use_gpu)."""
    worker = {"CPU": 1.0, **({"GPU": 1.0} if section.use_gpu else {})}
    return [Request(stage, section.num_workers, worker)]


def run_requests(cfg, cluster_has_gpu: bool) -> list[Request]:
    """Every request of `plabel run` with this config, stage by stage."""
    return [*train_requests(cfg.teacher, "teacher_train"), *label_requests(cfg.label, cluster_has_gpu),
            *train_requests(cfg.student, "student_train")]
