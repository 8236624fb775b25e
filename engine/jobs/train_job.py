"""`plabel train` with Ray Train: a TorchTrainer fits a U-Net (teacher or student).

Data stream through Ray Data (ray.train.get_dataset_shard), never collected on the driver:
  labelled_dataset        labelled shards -> image, masks, weight (all classes weighted 1)
  pseudo_labelled_dataset pseudo-label table parts, each with the images of its shard -> the same
                          columns, weight 0 for classes the quality gate dropped
The training loop itself (epochs, steps, validation, selection) is plabel.training.loop.fit; the
worker here feeds it the Ray dataset shards and reports its checkpoints.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as pads
import ray
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.data.dataset import MaterializedDataset
from ray.train.torch import TorchTrainer

from plabel.data import storage
from plabel.data.samples import batch_samples, decode_gray, sample_where
from plabel.data.shards import decode_masks
from plabel.data.table_commit import table_files
from plabel.jobs.resources import train_threads
from plabel.jobs.shard_dataset import read_shards
from plabel.method.preprocess import masks_to_grid, to_unet_input
from plabel.errors import InputError
from plabel.method.unet import UNet, check_starting_point, load_checkpoint, save_checkpoint
from plabel.training.loop import VAL_BATCH_SIZE, TrainConfig, array_batches, fit, shuffle_seed, validation_batches
from plabel.training.selection import GUARD_TOLERANCE, guard_note
from plabel.training.student_set import pseudo_part_arrays, shard_lookup

log = logging.getLogger(__name__)

MODEL_FILE = "model.pt"
SHUFFLE_BUFFER = 64  # rows in the local shuffle of each worker's training shard (Ray Data)
POLL_S = 1.0  # how often the driver reads the training progress


@ray.remote(num_cpus=0)
class ProgressBoard:
    """Where rank 0 of a Ray Train run posts each finished epoch, for the driver to show (a tiny
    actor: Ray Train's own reports reach its controller, not the driver)."""

    def __init__(self):
        self.last: dict | None = None

    def post(self, epoch: dict) -> None:
        self.last = epoch

    def read(self) -> dict | None:
        return self.last


@contextlib.contextmanager
def _watch(board, on_epoch: Callable[[dict], None]):
    """Call ``on_epoch`` on the driver with every new epoch posted to ``board`` while the body runs."""
    stop, seen = threading.Event(), [None]

    def show() -> None:
        try:
            epoch = ray.get(board.read.remote(), timeout=10)
        except Exception:  # a busy or restarting cluster: the next poll shows it
            return
        if epoch is not None and epoch != seen[0]:
            seen[0] = epoch
            on_epoch(epoch)

    def poll() -> None:
        while not stop.wait(POLL_S):
            show()

    thread = threading.Thread(target=poll, name="plabel-train-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        show()  # the last epoch, if the poll missed it
        ray.kill(board)


def prepare_labelled(batch: dict, image_size: int, num_classes: int, intensity: str) -> dict:
    """Raw WebDataset batch of labelled samples -> image float32 (N, S, S) (plabel.method.preprocess.
    to_unet_input with ``intensity``), masks uint8 (N, C, S, S), weight float32 (N, C). A sample without
    masks or with the wrong class count is an error."""

    images, masks = [], []
    for sample in batch_samples(batch):
        where = sample_where(sample)
        gray = decode_gray(sample)
        if "masks.npz" not in sample:
            raise InputError(f"{where}: labelled sample has no masks.npz member")
        m = decode_masks(bytes(sample["masks.npz"]))
        if m.shape[0] != num_classes or m.shape[1:] != gray.shape:
            raise InputError(f"{where}: masks of shape {m.shape} do not fit {num_classes} classes and image {gray.shape}")
        images.append(to_unet_input(gray, image_size, intensity))
        masks.append(masks_to_grid(m, image_size))
    n = len(images)
    return {
        "image": np.stack(images) if n else np.zeros((0, image_size, image_size), np.float32),
        "masks": np.stack(masks) if n else np.zeros((0, num_classes, image_size, image_size), np.uint8),
        "weight": np.ones((n, num_classes), np.float32),
    }


def _pseudo_part_batch(batch: dict, fs, classes: Sequence[str], image_size: int, intensity: str, shards: dict) -> dict:
    """Ray UDF: rows {part} (one Parquet part each) -> image, masks, weight of its trainable rows."""
    out = [pseudo_part_arrays(str(p), fs, classes, image_size, intensity, shards) for p in batch["part"]]
    return {k: np.concatenate([o[k] for o in out]) for k in ("image", "masks", "weight")}


def labelled_dataset(shards: Sequence[str], num_classes: int, image_size: int, intensity: str):
    ds = read_shards(shards)
    return ds.map_batches(prepare_labelled, fn_kwargs=dict(image_size=image_size, num_classes=num_classes,
                                                           intensity=intensity),
                          batch_format="numpy", batch_size=16)


def pseudo_labelled_dataset(table_dir: str, unlabelled_shards: Sequence[str], classes: Sequence[str], image_size: int,
                            intensity: str):
    """The pseudo-label rows (status ok/empty) with their images: one task per table part, which
    reads the one shard its rows come from (plabel.training.student_set.pseudo_part_arrays), in the
    table's part order: no join, no sort, the same rows in the same order in every run.

    table_dir (local or a URI) must hold a finished table: one without its completion marker in
    object storage raises table_commit.IncompleteTableError. unlabelled_shards: where the rows'
    shards are read (matched by path, else by file name); a row whose shard is not among them, or
    whose sample its shard lacks, fails the dataset with an InputError naming it."""

    fs, files = table_files(table_dir)
    items = [{"part": f} for f in files]
    return ray.data.from_items(items, override_num_blocks=max(1, len(items))).map_batches(
        _pseudo_part_batch, fn_kwargs=dict(fs=fs, classes=list(classes), image_size=image_size, intensity=intensity,
                                           shards=shard_lookup(unlabelled_shards)),
        batch_format="numpy", batch_size=1)


MATERIALIZE_LIMIT_BYTES = 2 * 1024**3


def is_materialized(n_images: int, num_classes: int, image_size: int, limit: int = MATERIALIZE_LIMIT_BYTES) -> bool:
    """Whether :func:`maybe_materialize` keeps a training set of ``n_images`` prepared images in the
    object store (their float32 image, masks and weights below ``limit`` bytes) rather than streaming it."""
    return n_images * (image_size * image_size * (4 + num_classes) + 4 * num_classes) <= limit


def maybe_materialize(ds, n_images: int, num_classes: int, image_size: int, limit: int = MATERIALIZE_LIMIT_BYTES,
                      expected_rows: int | None = None, what: str = "training set"):
    """Materialize a prepared training dataset in the Ray object store when it is small.

    Each epoch otherwise re-runs the whole read / decode (/ join) pipeline; a small dataset
    (n_images x bytes per prepared image below ``limit``) is computed once and then read from the
    distributed object store. Larger datasets keep streaming. Nothing is collected on the driver.
    expected_rows: a materialized dataset must hold exactly this many rows, else ValueError naming
    ``what`` (an image that lost its join partner would otherwise leave training silently); a
    streaming dataset is not counted (that would run its whole pipeline once more).
    """
    if not is_materialized(n_images, num_classes, image_size, limit):
        return ds
    ds.context.execution_options.preserve_order = True  # the same block order in every run (reproducible)
    ds = ds.materialize()
    if expected_rows is not None and (got := ds.count()) != expected_rows:
        raise InputError(f"{what}: {got} rows were prepared for training, expected {expected_rows}")
    return ds


def student_dataset(table_dir: str, unlabelled_shards: Sequence[str], labelled_shards: Sequence[str],
                    classes: Sequence[str], image_size: int, intensity: str, n_unlabelled: int, n_labelled: int,
                    what: str = "pseudo-label table with the images of the unlabelled shards"):
    """A student's training set: the labelled split's ``n_labelled`` images from ``labelled_shards``
    (none: pass [] and 0), then the table's pseudo-labelled images, through :func:`maybe_materialize`.
    A materialized set keeps that order (labelled first, then the table's part order: the rows
    quality.py hands fit_unet, so a one-worker student trains on the same batches) and must hold the
    labelled images plus the table's ok + empty rows (ValueError naming ``what`` otherwise)."""
    C, n_images = len(classes), n_unlabelled + n_labelled
    ds = pseudo_labelled_dataset(table_dir, unlabelled_shards, classes, image_size, intensity)
    if labelled_shards:
        ds = labelled_dataset(labelled_shards, C, image_size, intensity).union(ds)
    return maybe_materialize(ds, n_images, C, image_size, expected_rows=trainable_rows(table_dir) + n_labelled,
                             what=what)


def trainable_rows(table_dir: str) -> int:
    """Rows of a finished pseudo-label table that train a student (status ok or empty)."""

    fs, files = table_files(table_dir)
    status = pads.dataset(files, filesystem=fs, format="parquet").to_table(columns=["status"])["status"]
    return len(status) - pc.sum(pc.equal(status, "error")).as_py() if len(status) else 0


def _train_loop(config: dict) -> None:
    """Ray Train worker: plabel.training.loop.fit over this worker's dataset shards; after the first and
    the last epoch, and between them every config["checkpoint_every_s"] seconds (:func:`checkpoint_due`;
    0: every epoch), a checkpoint (the training state, state.pt, and the kept weights, model.pt) goes
    to ray.train.report; a restarted or re-run trainer resumes from the latest one."""

    cfg = TrainConfig.from_dict(config["train"])
    classes, role = config["classes"], config["role"]
    torch.set_num_threads(worker_threads(config.get("threads")))
    rule, tolerance = config.get("selection", "mean"), float(config.get("selection_tolerance", GUARD_TOLERANCE))
    rank = ray.train.get_context().get_world_rank()

    def log(line: str) -> None:
        if rank == 0:
            print(f"[{role}] {line}", flush=True)

    log(f"torch threads: {torch.get_num_threads()}")
    resume, init_state = None, None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:  # resume after a failure or an interrupted run
        with ckpt.as_directory() as d:
            resume = torch.load(os.path.join(d, "state.pt"), weights_only=True)
            if os.path.exists(os.path.join(d, MODEL_FILE)):
                best_model, _, best_extra = load_checkpoint(os.path.join(d, MODEL_FILE))
                resume.update(best_state=best_model.state_dict(), best_epoch=best_extra.get("epoch"),
                              best_val_dice_per_class=best_extra.get("val_dice_per_class"))
        log(f"resuming from the checkpoint of epoch {int(resume['epoch']) + 1}/{cfg.epochs}")
    elif config.get("init_checkpoint"):  # a student warm-started from its teacher (student.init)
        # (train_unet checked the architecture before Ray started; load_state_dict refuses any other)
        init_state = load_checkpoint(config["init_checkpoint"])[0].state_dict()
        log(f"starting from the weights of {storage.redact(config['init_checkpoint'])}")

    # distillation (student.distill): the teacher's soft outputs for the classes without pseudo labels
    teacher, distill = None, float(config.get("distill", 0.0))
    if distill > 0 and config.get("distill_from"):
        teacher = load_checkpoint(config["distill_from"])[0]

    train_shard, val_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")

    if config.get("in_memory"):
        # a small training set (in_worker_memory): this worker's shard read once, then shuffled each
        # epoch as fit_unet shuffles (loop.array_batches): no Ray Data pipeline thread runs beside the
        # optimisation steps, which slowed them (benchmarks/RESULTS.md, section 1)
        train_rows = shard_arrays(train_shard)
        if not train_rows:
            raise ValueError(f"the training shard of Ray Train worker {rank} holds no rows")
        train_batches = array_batches(train_rows, cfg.batch_size, seed=cfg.seed, shuffle=cfg.shuffle, rank=rank)
        val_batches = validation_batches(shard_arrays(val_shard))
    else:
        # The batches keep the dataset's dtypes (image float32, masks uint8, weight float32: zero-copy
        # tensors); train_step casts the masks in this thread. A dtypes= cast would run in Ray Data's
        # collate threads, each of which then holds its own OpenMP team: with more OpenMP threads than
        # cores libgomp stops spin-waiting (benchmarks/RESULTS.md, section 1).
        def train_batches(epoch: int):  # this worker's shard, in a seeded local shuffle (loop.shuffle_seed)
            shuffle = dict(local_shuffle_buffer_size=SHUFFLE_BUFFER,
                           local_shuffle_seed=shuffle_seed(cfg.seed, epoch, rank))
            return train_shard.iter_torch_batches(batch_size=cfg.batch_size, **(shuffle if cfg.shuffle else {}))

        def val_batches():
            return val_shard.iter_torch_batches(batch_size=VAL_BATCH_SIZE)

    every_s, last_report = float(config.get("checkpoint_every_s", 0.0)), [None]
    world = ray.train.get_context().get_world_size()

    def report(state) -> None:
        """The epoch's metrics and checkpoint (written by rank 0) to Ray Train, when checkpoint_due says so."""
        h = state.history[-1]
        if rank == 0 and config.get("progress_board") is not None:
            config["progress_board"].post.remote({"epoch": h["epoch"] + 1, "epochs": cfg.epochs, "loss": h["loss"],
                                                  "val_dice": h["val_dice"]})
        now = time.monotonic()
        due = checkpoint_due(h["epoch"], state.start_epoch, cfg.epochs, last_report[0], now, every_s)
        if world > 1:  # rank 0's clock decides for all: Ray Train needs the same number of reports from each worker
            flag = torch.tensor([int(due)])
            torch.distributed.broadcast(flag, src=0)
            due = bool(flag.item())
        if not due:
            return
        last_report[0] = now
        metrics = {"epoch": h["epoch"], "loss": h["loss"],
                   "val_dice": float("nan") if h["val_dice"] is None else h["val_dice"],
                   "start_epoch": state.start_epoch}
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if rank == 0:
                full = state.checkpoint()
                kept = {k: full.pop(k) for k in ("best_state", "best_epoch", "best_val_dice_per_class")}
                torch.save(full, os.path.join(d, "state.pt"))
                best_model = UNet.from_config(state.config)
                best_model.load_state_dict(kept["best_state"])
                guard = None
                if kept["best_epoch"] == -1 and state.reference_val_dice is not None:  # the teacher's weights kept
                    guard = guard_note(state.reference_val_dice, [(e["epoch"], e["val_dice_per_class"])
                                                                  for e in state.history], classes, tolerance)
                save_checkpoint(os.path.join(d, MODEL_FILE), best_model, state.config,
                                {"classes": classes, "image_size": config["image_size"], "epoch": kept["best_epoch"],
                                 "val_dice": state.best_val_dice, "role": role,
                                 "val_dice_per_class": kept["best_val_dice_per_class"], "selection": rule,
                                 "guard": guard})
                checkpoint = Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=checkpoint)

    fit(cfg, len(classes), train_batches, val_batches, init_state=init_state, selection=rule, tolerance=tolerance,
        teacher=teacher, distill=distill, resume=resume, prepare=ray.train.torch.prepare_model, rank=rank,
        on_epoch_end=report, log=log)


def checkpoint_due(epoch: int, start_epoch: int, epochs: int, last: float | None, now: float, every_s: float) -> bool:
    """Whether ``epoch`` (0-based) of a run of ``epochs`` that started (or resumed) at ``start_epoch``
    ends with a Ray Train report and checkpoint: its first and last epoch always, otherwise when
    ``every_s`` seconds have passed since the last report at ``last`` (``now``, ``last``: one clock;
    ``last`` is None only before the first epoch's report)."""
    return epoch in (start_epoch, epochs - 1) or now - last >= every_s


# a materialized training set of at most this many bytes is read into each Ray Train worker's memory
IN_MEMORY_BYTES = 512 * 1024**2


def in_worker_memory(ds) -> bool:
    """Whether the Ray Train workers read their training shard into memory once (a materialized
    dataset of at most IN_MEMORY_BYTES, plabel.jobs.train_job.maybe_materialize's small sets) rather
    than stream it through Ray Data every epoch."""
    return isinstance(ds, MaterializedDataset) and ds.size_bytes() <= IN_MEMORY_BYTES


def shard_arrays(shard) -> dict[str, torch.Tensor]:
    """A Ray Data shard read once into tensors, column -> (N, ...) in the shard's row order, the
    columns' own dtypes ({} for an empty shard)."""
    parts = [b for b in shard.iter_batches(batch_size=None, batch_format="numpy") if len(next(iter(b.values())))]
    return {k: torch.from_numpy(np.concatenate([p[k] for p in parts])) for k in parts[0]} if parts else {}


def worker_path(location: str | Path) -> str:
    """A checkpoint's location as a Ray Train worker must be given it: a URI as it is, a local path
    made absolute (the worker runs in its own working directory, not the user's)."""
    return str(location) if storage.is_uri(str(location)) else str(Path(location).resolve())


def worker_threads(threads: int | None) -> int:
    """This Ray Train worker's torch threads (plabel.jobs.resources.train_threads) from its node's Ray
    CPU count, the cores it may run on and the Train workers on its node."""
    node = ray.get_runtime_context().get_node_id()
    node_cpus = next((n["Resources"].get("CPU", 1.0) for n in ray.nodes() if n["NodeID"] == node), 1.0)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return train_threads(threads, node_cpus, cores, ray.train.get_context().get_local_world_size())


def _data_config():
    """Ray Train's data config: the training set split over the workers; blocks reach each worker in
    the dataset's order (preserve_order), so that with a seeded local shuffle a run is reproducible."""

    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return DataConfig(datasets_to_split=["train"], execution_options=options)


def train_unet(train_ds, val_ds, classes: Sequence[str], section, out_path: str | Path, storage_dir: str | Path,
               name: str, role: str = "teacher", init_checkpoint: str | None = None,
               distill_from: str | None = None, on_epoch: Callable[[dict], None] | None = None) -> dict:
    """Fit a U-Net with a TorchTrainer; copies the best-validation model to out_path.

    init_checkpoint: a U-Net checkpoint (path or URI) of the same architecture to start from (the
    student's teacher); None: a fresh U-Net seeded by section.seed. A resumed run ignores it.
    distill_from: a U-Net checkpoint (the teacher) whose soft outputs train the classes a sample has
    no label for (weight 0: dropped by the gate) with strength section.distill (0: off).
    section.selection picks the kept epoch (plabel.training.selection): 'guarded' with an init_checkpoint
    keeps no epoch that lost a class on the validation images, the starting weights if every one
    did (best_epoch -1); otherwise the best mean validation Dice.

    section: plabel.schemas.config.TrainSection. Returns {"best_val_dice", "best_epoch", "epochs",
    "resumed_from_epoch", "wall_s"}. Epochs end with a checkpoint (section.checkpoint_every_s; the full training state
    plus the best-validation model) in storage_dir/name; re-running with the same storage_dir and
    name (after a crash, a kill, a lost node) resumes after the last one. out_path and
    storage_dir may be URIs (plabel.data.storage); Ray Train then keeps its checkpoints there.
    on_epoch: called on the driver after every epoch (as rank 0 finishes it, polled every
    POLL_S seconds) with {"epoch": epochs done, "epochs", "loss", "val_dice"}.
    """

    t0 = time.time()
    train_cfg = TrainConfig.from_section(section)

    want = train_cfg.unet_config(len(classes))
    for use, start in (("distill", distill_from), ("init", init_checkpoint)):  # fail here, before Ray starts
        if start is not None:
            check_starting_point(storage.redact(str(start)), load_checkpoint(start)[1], want, use, role)
    if storage.is_uri(storage_dir):  # the resolved filesystem: Ray never sees a URI's credentials
        storage_fs, (storage_path,) = storage.resolve_all([str(storage_dir)])
    else:
        storage_fs, storage_path = None, str(Path(storage_dir).resolve())
    storage_name = storage.join(storage.redact(str(storage_path if storage_fs is None else storage_dir)), name)
    board = ProgressBoard.remote() if on_epoch is not None else None
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"train": train_cfg.to_dict(), "classes": list(classes), "image_size": section.image_size,
                           "role": role, "init_checkpoint": None if init_checkpoint is None else worker_path(init_checkpoint),
                           "selection": section.selection, "selection_tolerance": section.selection_tolerance,
                           "distill": section.distill if distill_from is not None else 0.0,
                           "distill_from": None if distill_from is None else worker_path(distill_from),
                           "progress_board": board, "threads": section.threads,
                           "checkpoint_every_s": section.checkpoint_every_s, "in_memory": in_worker_memory(train_ds)},
        scaling_config=ScalingConfig(num_workers=section.num_workers, use_gpu=section.use_gpu,
                                     resources_per_worker={"CPU": 1}),
        datasets={"train": train_ds, "val": val_ds},
        dataset_config=_data_config(),
        run_config=RunConfig(name=name, storage_path=storage_path, storage_filesystem=storage_fs,
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=2)),
    )
    with _watch(board, on_epoch) if board is not None else contextlib.nullcontext():
        result = trainer.fit()  # resumes from the run's latest checkpoint in storage_dir/name, if any
    if result.error:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"training {name} produced no checkpoint under {storage_name}")

    with result.checkpoint.as_directory() as d:
        best_path = Path(d) / MODEL_FILE
        if storage.is_uri(out_path):
            storage.copy_file(str(best_path), str(out_path))  # one upload: atomic in object stores
        else:
            out_path = Path(out_path)
            out_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = out_path.with_name(f".{out_path.name}.tmp")
            shutil.copyfile(best_path, tmp)
            os.replace(tmp, out_path)
        _, _, extra = load_checkpoint(best_path)
    metrics = result.metrics or {}
    return {"best_val_dice": extra.get("val_dice"), "best_epoch": extra.get("epoch"), "epochs": section.epochs,
            # guarded selection kept the starting weights (best_epoch -1): why (selection.guard_note)
            "guard": extra.get("guard"),
            # 0: trained from scratch; k: resumed after epoch k from a checkpoint of an earlier run
            "resumed_from_epoch": int(metrics.get("start_epoch", 0)),
            "wall_s": round(time.time() - t0, 2)}
