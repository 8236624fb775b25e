"""Where the tests find the data that lives beside the repository, in ../shared.

The real chest X-rays (JSRT, 256 px) are at ``../shared/data/jsrt256`` relative to the repository, or
wherever PLABEL_JSRT points; the KubeRay CRDs at ``../shared/kuberay-crds/v1.7.0`` (PLABEL_KUBERAY_CRDS).
A test that needs them skips when they are absent on a developer's machine, and FAILS under CI
(CI=true): CI always has ../shared beside its clone, so a missing folder there is a broken setup,
not a reason to pass.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def jsrt_path() -> Path:
    """The JSRT folder (images/, masks/<class>/, classes.json), present or not."""
    return Path(os.environ.get("PLABEL_JSRT") or SHARED / "data" / "jsrt256")


def crds_path() -> Path:
    """The KubeRay v1.7.0 CRD folder, present or not."""
    return Path(os.environ.get("PLABEL_KUBERAY_CRDS") or SHARED / "kuberay-crds" / "v1.7.0")


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(path: Path, what: str, marker: str | None = None) -> Path:
    """``path`` if it exists (and holds ``marker`` when given); else fail under CI, skip elsewhere."""
    if path.exists() and (marker is None or (path / marker).exists()):
        return path
    message = f"{what} not found at {path}" + (f" (no {marker})" if marker else "")
    if in_ci():
        pytest.fail(f"{message}: CI runs with ../shared beside the clone", pytrace=False)
    pytest.skip(message)
