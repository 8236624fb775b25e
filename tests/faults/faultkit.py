"""Helpers of the fault tests: a tiny dataset and teacher, processes started with a marker in their
environment (so that exactly those, and the Ray processes they start, can be killed), finding Ray
actor processes, comparing tables.

Never `ray stop` (it kills every Ray on the machine): processes are stopped by PID only.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared procs module
from procs import cmdline, descendants, pids_with_env  # noqa: E402

MARKER = "PLABEL_FAULT_TEST"  # environment variable carrying a per-run id
# batches of one shard (SHARD_SIZE images): the same images share a batch in every run, so
# tables of different runs are equal bit for bit (float results may change with batch composition)
# one SAM actor, never compiled: the faults below are aimed at "the" SAM actor and its node
LABEL_ARGS = ["--sam-backend", "random_tiny", "--sam-batch-size", "4", "--sam-actors", "1", "--sam-compile", "off",
              "--unet-batch-size", "4", "--threshold", "0.3"]


def label_section():
    """The label settings of the fault tests, as `plabel label` builds them from LABEL_ARGS."""
    from plabel.schemas.config import LabelSection, build

    return build(LabelSection, {"sam": {"backend": "random_tiny", "batch_size": 4, "actors": 1, "compile": False},
                                "unet_batch_size": 4,
                                "cleaning": {"threshold": 0.3}}, "label")


def tiny_teacher(path: Path, classes, size: int = 64, steps: int = 60) -> None:
    """A tiny U-Net (base 4, depth 2) fitted for a few steps on 8 synthetic images (seconds on one
    core): its masks vary from image to image (a random U-Net's are constant), which is all a
    plumbing test needs."""
    import numpy as np
    import torch

    from plabel.data.synthetic import render_synthetic
    from plabel.training.loop import TrainConfig, build_model, make_optimizer, train_step
    from plabel.method.unet import save_checkpoint

    data = [render_synthetic(i, size=size, seed=99) for i in range(8)]
    images = torch.tensor(np.stack([d[0] for d in data])[:, None] / 255.0, dtype=torch.float32)
    masks = torch.tensor(np.stack([d[1] for d in data]), dtype=torch.float32)
    cfg = TrainConfig(epochs=1, lr=0.01, batch_size=8, base_channels=4, depth=2, augment=False, seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model, ucfg = build_model(cfg, len(classes))
            opt, _ = make_optimizer(model, cfg)
            gen = torch.Generator().manual_seed(0)
            for _ in range(steps):
                train_step(model, opt, images, masks, None, None, cfg, gen)
    finally:
        torch.set_num_threads(threads)
    save_checkpoint(path, model.eval(), ucfg, {"classes": list(classes), "image_size": size, "role": "teacher"})


def make_dataset(root: Path, n_images: int, shard_size: int, labelled: int = 2, val: int = 0,
                 size: int = 64, teacher: bool = True) -> dict:
    """Synthetic images ingested into root/shards (n_images - labelled - val unlabelled ones) and
    (teacher) a tiny teacher at root/teacher.pt. Returns the manifest."""
    from plabel.data.ingest import ingest
    from plabel.data.synthetic import make_synthetic_dataset

    make_synthetic_dataset(root / "data", n_images=n_images, size=size, seed=1)
    manifest = ingest(root / "data", root / "shards", counts={"labelled": labelled, "val": val}, shard_size=shard_size)
    if teacher:
        tiny_teacher(root / "teacher.pt", manifest["classes"], size)
    return manifest


# ----------------------------------------------------------------------------- processes


_TMPDIRS: dict[str, str] = {}  # run id -> its RAY_TMPDIR, removed by kill_run


def private_env(run_id: str | None = None) -> tuple[dict, str]:
    """An environment for a subprocess that starts its own Ray: a marker, a private RAY_TMPDIR
    (sessions and the 'current cluster' file stay out of /tmp/ray, so no other Ray on the machine
    connects to it), no RAY_ADDRESS. Returns (env, run id)."""
    run_id = run_id or uuid.uuid4().hex[:12]
    tmp = tempfile.mkdtemp(prefix="pf-", dir="/tmp")  # short: Ray's socket paths
    _TMPDIRS[run_id] = tmp
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RAY_ADDRESS") and k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    env.update({MARKER: run_id, "RAY_TMPDIR": tmp, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                "PYTHONUNBUFFERED": "1",
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"})
    return env, run_id


def start(args: list[str], env: dict, log_path: Path, cwd=None) -> subprocess.Popen:
    """Start a command in its own process group, output to log_path."""
    fh = open(log_path, "ab")
    return subprocess.Popen(args, env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True)


def plabel(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "plabel"), *args]


def marked_pids(run_id: str) -> list[int]:
    """PIDs of processes whose environment carries MARKER=run_id (this process excluded)."""
    return pids_with_env(MARKER, run_id)


def kill_run(proc: subprocess.Popen | None, run_id: str, sig: int = signal.SIGKILL) -> list[int]:
    """Kill the process group of proc and every process carrying the run's marker; reap proc;
    remove the run's RAY_TMPDIR."""
    killed = []
    if proc is not None and proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
            killed.append(proc.pid)
        except ProcessLookupError:
            pass
    for _ in range(3):  # Ray may still be spawning workers
        pids = marked_pids(run_id)
        for pid in pids:
            try:
                os.kill(pid, sig)
                killed.append(pid)
            except ProcessLookupError:
                pass
        if not pids:
            break
        time.sleep(0.5)
    if proc is not None:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    if run_id in _TMPDIRS and not marked_pids(run_id):
        shutil.rmtree(_TMPDIRS.pop(run_id), ignore_errors=True)
    return killed


def actor_pids(name: str, under: int | None = None, run_id: str | None = None, busy: bool = False) -> list[int]:
    """PIDs of Ray worker processes whose title names ``name`` (e.g. 'MapBatches(RefineStage)'),
    among the descendants of ``under`` or the processes carrying run_id's marker. busy: only
    actors running a task now (Ray titles them 'ray::MapWorker(<name>).submit' meanwhile)."""
    pool = descendants(under) if under is not None else marked_pids(run_id)
    want = f"MapWorker({name}).submit" if busy else name
    return [p for p in pool if want in cmdline(p) and "ray::" in cmdline(p)]


def wait_for(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what} not reached in {timeout:.0f} s")


# ----------------------------------------------------------------------------- tables


def staged_parts(out: Path) -> list[Path]:
    """Committed part files of an unfinished local table (its staging folder)."""
    staging = out.parent / f".{out.name}.inprogress"
    return sorted(staging.glob("part-*.parquet")) if staging.is_dir() else []


def sorted_rows(table) -> list[dict]:
    return sorted(table.to_pylist(), key=lambda r: r["id"])


def assert_exactly_once(table, ids_in) -> None:
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)), f"duplicate ids: {sorted({i for i in ids if ids.count(i) > 1})[:10]}"
    assert sorted(ids) == sorted(ids_in), (f"lost {sorted(set(ids_in) - set(ids))[:10]}, "
                                           f"unexpected {sorted(set(ids) - set(ids_in))[:10]}")


def assert_same_rows(a, b) -> None:
    """Row by row (sorted by id), every column equal (masks byte for byte)."""
    ra, rb = sorted_rows(a), sorted_rows(b)
    assert len(ra) == len(rb)
    assert a.schema.names == b.schema.names
    for x, y in zip(ra, rb):
        assert x == y, {k: (x[k], y[k]) for k in x if x[k] != y[k]}
