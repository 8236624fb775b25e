"""`plabel train` with Ray Train: a TorchTrainer fits a U-Net (teacher or student).

Data stream through Ray Data (ray.train.get_dataset_shard), never collected on the driver:
  labelled_dataset        labelled shards -> image, masks, weight (all classes weighted 1)
  pseudo_labelled_dataset pseudo-label table joined with the unlabelled shards on id -> the same
                          columns, weight 0 for classes the quality gate dropped
The per-step maths (augmentation, loss, optimiser) is plabel.training.loop's.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

log = logging.getLogger(__name__)

MODEL_FILE = "model.pt"


def prepare_labelled(batch: dict, image_size: int, num_classes: int) -> dict:
    """Raw WebDataset batch of labelled samples -> image float32 (N, S, S), masks uint8 (N, C, S, S),
    weight float32 (N, C). A sample without masks or with the wrong class count is an error."""
    from plabel.data.samples import batch_samples, decode_gray, sample_where
    from plabel.method.preprocess import masks_to_grid, to_unet_input
    from plabel.data.shards import decode_masks

    images, masks = [], []
    for sample in batch_samples(batch):
        where = sample_where(sample)
        gray = decode_gray(sample)
        if "masks.npz" not in sample:
            raise ValueError(f"{where}: labelled sample has no masks.npz member")
        m = decode_masks(bytes(sample["masks.npz"]))
        if m.shape[0] != num_classes or m.shape[1:] != gray.shape:
            raise ValueError(f"{where}: masks of shape {m.shape} do not fit {num_classes} classes and image {gray.shape}")
        images.append(to_unet_input(gray, image_size))
        masks.append(masks_to_grid(m, image_size))
    n = len(images)
    return {
        "image": np.stack(images) if n else np.zeros((0, image_size, image_size), np.float32),
        "masks": np.stack(masks) if n else np.zeros((0, num_classes, image_size, image_size), np.uint8),
        "weight": np.ones((n, num_classes), np.float32),
    }


def prepare_unlabelled_images(batch: dict, image_size: int) -> dict:
    """Raw WebDataset batch -> id, image float32 (N, S, S) (undecodable samples are skipped here:
    the pseudo-label table already records them as error rows)."""
    from plabel.data.samples import batch_samples, decode_gray, object_array
    from plabel.method.preprocess import to_unet_input

    ids, images = [], []
    for sample in batch_samples(batch):
        try:
            sid = json.loads(bytes(sample["json"]))["id"] if "json" in sample else str(sample["__key__"])
            gray = decode_gray(sample)
        except Exception:  # noqa: BLE001
            continue
        ids.append(sid)
        images.append(to_unet_input(gray, image_size))
    return {"id": object_array(ids), "image": np.stack(images) if images else np.zeros((0, image_size, image_size), np.float32)}


def prepare_pseudo(batch: dict, classes: Sequence[str], image_size: int) -> dict:
    """Joined rows (table columns + image) -> image, masks (kept pseudo labels), weight."""
    from plabel.method.labelling import pseudo_label_targets

    rows = [{k: batch[k][i] for k in batch} for i in range(len(batch["id"]))]
    masks, weight = pseudo_label_targets(rows, classes, image_size)
    return {"image": np.asarray(batch["image"], np.float32), "masks": masks, "weight": weight}


def labelled_dataset(shards: Sequence[str], num_classes: int, image_size: int):
    from plabel.data.shard_reader import read_shards

    ds = read_shards(shards)
    return ds.map_batches(prepare_labelled, fn_kwargs=dict(image_size=image_size, num_classes=num_classes),
                          batch_format="numpy", batch_size=16)


def pseudo_labelled_dataset(table_dir: str, unlabelled_shards: Sequence[str], classes: Sequence[str], image_size: int,
                            ordered: bool = True):
    """Pseudo-label rows (status ok/empty) joined with their images by id.

    table_dir (local or a URI) must hold a finished table: one without its completion marker in
    object storage raises table_commit.IncompleteTableError. ordered: sort the joined rows by id (the
    join's output order varies from run to run), so that a training run is reproducible; a sort is
    one more shuffle, which a streamed set (not materialized, see :func:`is_materialized`) would
    repeat every epoch."""
    import ray
    from plabel.data.table_commit import table_files
    from plabel.data.shard_reader import read_shards
    from plabel.schemas.tables import class_column

    cols = ["id", "status", "height", "width"] + [class_column(c, f) for c in classes for f in ("mask", "kept")]
    from ray.data.expressions import col

    fs, files = table_files(table_dir)
    table = ray.data.read_parquet(files, filesystem=fs).select_columns(cols).filter(expr=col("status") != "error")
    images = read_shards(unlabelled_shards).map_batches(
        prepare_unlabelled_images, fn_kwargs=dict(image_size=image_size), batch_format="numpy", batch_size=16)
    joined = table.join(images, join_type="inner", num_partitions=max(1, min(8, len(unlabelled_shards))), on=("id",))
    if ordered:
        joined = joined.sort("id")
    return joined.map_batches(prepare_pseudo, fn_kwargs=dict(classes=list(classes), image_size=image_size),
                              batch_format="numpy", batch_size=16)


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
        raise ValueError(f"{what}: {got} rows were prepared for training, expected {expected_rows}")
    return ds


def student_dataset(table_dir: str, unlabelled_shards: Sequence[str], labelled_shards: Sequence[str],
                    classes: Sequence[str], image_size: int, n_unlabelled: int, n_labelled: int,
                    what: str = "pseudo-label table joined with the unlabelled shards"):
    """A student's training set: the table's pseudo-labelled images, plus the labelled split's
    ``n_labelled`` images from ``labelled_shards`` (none: pass [] and 0), through :func:`maybe_materialize`.
    A materialized set is sorted by id (reproducible runs) and must hold the table's ok + empty rows
    plus the labelled images (ValueError naming ``what`` otherwise)."""
    C, n_images = len(classes), n_unlabelled + n_labelled
    ds = pseudo_labelled_dataset(table_dir, unlabelled_shards, classes, image_size,
                                 ordered=is_materialized(n_images, C, image_size))
    if labelled_shards:
        ds = ds.union(labelled_dataset(labelled_shards, C, image_size))
    return maybe_materialize(ds, n_images, C, image_size, expected_rows=pseudo_label_rows(table_dir) + n_labelled,
                             what=what)


def pseudo_label_rows(table_dir: str) -> int:
    """Rows of a finished pseudo-label table that train a student (status ok or empty)."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    from plabel.data.table_commit import table_files

    fs, files = table_files(table_dir)
    status = pads.dataset(files, filesystem=fs, format="parquet").to_table(columns=["status"])["status"]
    return len(status) - pc.sum(pc.equal(status, "error")).as_py() if len(status) else 0


def _train_loop(config: dict) -> None:
    """Ray Train worker loop: epochs over this worker's shard, validation Dice, best checkpoint."""
    import torch
    import ray.train
    from ray.train import Checkpoint

    from plabel.data import storage
    from plabel.method.losses import distillation_weight, positive_class_weights
    from plabel.training.selection import GUARD_TOLERANCE, EpochSelector
    from plabel.training.loop import TrainConfig, build_model, evaluate_batch, make_optimizer, train_step, weights_copy
    from plabel.method.unet import UNet, load_checkpoint, save_checkpoint

    cfg = TrainConfig.from_dict(config["train"])
    classes = config["classes"]
    torch.manual_seed(cfg.seed)
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    model, ucfg = build_model(cfg, len(classes))
    opt, sched = make_optimizer(model, cfg)
    start_epoch, best_state, best_extra, selector = 0, None, None, None
    rule, tolerance = config.get("selection", "mean"), float(config.get("selection_tolerance", GUARD_TOLERANCE))
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:  # resume after a failure or an interrupted run
        with ckpt.as_directory() as d:
            state = torch.load(os.path.join(d, "state.pt"), weights_only=True)
            if os.path.exists(os.path.join(d, MODEL_FILE)):
                best_model, _, best_extra = load_checkpoint(os.path.join(d, MODEL_FILE))
                best_state = best_model.state_dict()
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start_epoch = int(state["epoch"]) + 1
        if "selector" in state:
            selector = EpochSelector.from_state(state["selector"])
        else:  # a checkpoint written before plabel.training.selection: the mean rule it used
            kept = best_extra.get("epoch") if best_extra else None
            selector = EpochSelector(None, tolerance, None if kept is None else int(kept), float(state["best"]))
        if rank == 0:
            print(f"[{config['role']}] resuming from the checkpoint of epoch {start_epoch}/{cfg.epochs}", flush=True)
    elif config.get("init_checkpoint"):  # a student warm-started from its teacher (student.init)
        # (train_unet checked the architecture before Ray started; load_state_dict refuses any other)
        model.load_state_dict(load_checkpoint(config["init_checkpoint"])[0].state_dict())
        if rank == 0:
            print(f"[{config['role']}] starting from the weights of {storage.redact(config['init_checkpoint'])}",
                  flush=True)
    model = ray.train.torch.prepare_model(model)
    base = model.module if hasattr(model, "module") else model
    device = next(model.parameters()).device
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")

    def validate() -> np.ndarray:
        """Per-class mean validation Dice (C,) of the current weights; (0,) without validation data."""
        dices = [evaluate_batch(base, b["image"][:, None].to(device), b["masks"])
                 for b in val_shard.iter_torch_batches(batch_size=8, dtypes=torch.float32)]
        per_image = np.concatenate(dices) if dices else np.zeros((0, len(classes)))
        return per_image.mean(axis=0) if len(per_image) else np.zeros(0)

    def keep(epoch: int, per_class: np.ndarray) -> None:
        nonlocal best_state, best_extra
        best_state = weights_copy(base)
        best_extra = {"classes": classes, "image_size": config["image_size"], "epoch": epoch,
                      "val_dice": float(per_class.mean()) if len(per_class) else None, "role": config["role"],
                      "val_dice_per_class": per_class.tolist(), "selection": rule}

    if selector is None:  # a fresh run; guarded (plabel.training.selection): the starting weights are a candidate
        reference = None
        if rule == "guarded" and config.get("init_checkpoint"):
            reference = validate()
            if len(reference):
                keep(-1, reference)
                if rank == 0:
                    print(f"[{config['role']}] starting weights: val dice per class "
                          f"{np.round(reference, 4).tolist()} (guarded selection)", flush=True)
            else:
                reference = None
        selector = EpochSelector.for_rule(rule, reference, tolerance)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank)

    # positive-class weights from (up to) the first 32 batches of this worker's shard
    pos, tot = np.zeros(len(classes)), np.zeros(len(classes))
    for j, b in enumerate(train_shard.iter_batches(batch_size=cfg.batch_size, batch_format="numpy")):
        w = b["weight"][:, :, None, None]
        pos += (b["masks"] * w).sum(axis=(0, 2, 3))
        tot += (np.ones_like(b["masks"]) * w).sum(axis=(0, 2, 3))
        if j >= 31:
            break
    pos_weight = positive_class_weights(np.clip(pos / np.maximum(tot, 1), 1e-4, 1.0), cfg.pos_weight_max)

    # distillation (student.distill): the teacher's soft outputs for the classes without pseudo labels
    teacher, distill = None, float(config.get("distill", 0.0))
    if distill > 0 and config.get("distill_from"):
        teacher = load_checkpoint(config["distill_from"])[0].to(device).eval()

    for epoch in range(start_epoch, cfg.epochs):
        losses = []
        for b in train_shard.iter_torch_batches(batch_size=cfg.batch_size, local_shuffle_buffer_size=64,
                                                local_shuffle_seed=(cfg.seed * 1009 + rank) * 1009 + epoch,
                                                dtypes=torch.float32):
            dw = None if teacher is None else distillation_weight(b["weight"], distill)
            losses.append(train_step(model, opt, b["image"][:, None], b["masks"], b["weight"], pos_weight, cfg, gen,
                                     teacher, dw))
        sched.step()
        per_class = validate()
        val_dice = float(per_class.mean()) if len(per_class) else float("nan")
        metrics = {"epoch": epoch, "loss": float(np.mean(losses)) if losses else float("nan"), "val_dice": val_dice,
                   "start_epoch": start_epoch}
        if rank == 0:
            print(f"[{config['role']}] epoch {epoch + 1}/{cfg.epochs}: loss {metrics['loss']:.4f}, "
                  f"val dice {val_dice:.4f}", flush=True)
        if selector.offer(epoch, per_class) or best_state is None:
            keep(epoch, per_class)  # the kept weights so far travel in every checkpoint as model.pt
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if rank == 0:
                torch.save({"model": base.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                            "epoch": epoch, "best": selector.best_score, "selector": selector.state()},
                           os.path.join(d, "state.pt"))
                best_model = UNet.from_config(ucfg)
                best_model.load_state_dict(best_state)
                save_checkpoint(os.path.join(d, MODEL_FILE), best_model, ucfg, best_extra)
                checkpoint = Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=checkpoint)


def _data_config():
    """Ray Train's data config: the training set split over the workers; blocks reach each worker in
    the dataset's order (preserve_order), so that with a seeded local shuffle a run is reproducible."""
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return DataConfig(datasets_to_split=["train"], execution_options=options)


def train_unet(train_ds, val_ds, classes: Sequence[str], section, out_path: str | Path, storage_dir: str | Path,
               name: str, role: str = "teacher", init_checkpoint: str | None = None,
               distill_from: str | None = None) -> dict:
    """Fit a U-Net with a TorchTrainer; copies the best-validation model to out_path.

    init_checkpoint: a U-Net checkpoint (path or URI) of the same architecture to start from (the
    student's teacher); None: a fresh U-Net seeded by section.seed. A resumed run ignores it.
    distill_from: a U-Net checkpoint (the teacher) whose soft outputs train the classes a sample has
    no label for (weight 0: dropped by the gate) with strength section.distill (0: off).
    section.selection picks the kept epoch (plabel.training.selection): 'guarded' with an init_checkpoint
    keeps no epoch that lost a class on the validation images, the starting weights if every one
    did (best_epoch -1); otherwise the best mean validation Dice.

    section: plabel.schemas.config.TrainSection. Returns {"best_val_dice", "best_epoch", "epochs",
    "resumed_from_epoch", "wall_s"}. Every epoch ends with a checkpoint (the full training state
    plus the best-validation model) in storage_dir/name; re-running with the same storage_dir and
    name (after a crash, a kill, a lost node) resumes after the last one. out_path and
    storage_dir may be URIs (plabel.data.storage); Ray Train then keeps its checkpoints there.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from plabel.data import storage
    from plabel.training.loop import TrainConfig

    t0 = time.time()
    train_cfg = TrainConfig.from_section(section)
    from plabel.method.unet import load_checkpoint

    if distill_from is not None:  # fail here, before Ray starts, when the teacher cannot be read or used
        _, d_cfg, _ = load_checkpoint(distill_from)
        if d_cfg.num_classes != len(classes):
            raise ValueError(f"{storage.redact(str(distill_from))}: its U-Net has {d_cfg.num_classes} classes, the "
                             f"{role}'s data {len(classes)}; cannot distil from it")
    if init_checkpoint is not None:  # fail here, before Ray starts, when the weights cannot fit
        _, init_cfg, _ = load_checkpoint(init_checkpoint)
        want = train_cfg.unet_config(len(classes))
        if init_cfg != want:
            raise ValueError(f"{storage.redact(str(init_checkpoint))}: its U-Net (base_channels {init_cfg.base_channels}, "
                             f"depth {init_cfg.depth}, {init_cfg.num_classes} classes) does not match the {role}'s "
                             f"(base_channels {want.base_channels}, depth {want.depth}, {want.num_classes} classes); "
                             "cannot start from its weights")
    if storage.is_uri(storage_dir):  # the resolved filesystem: Ray never sees a URI's credentials
        storage_fs, (storage_path,) = storage.resolve_all([str(storage_dir)])
    else:
        storage_fs, storage_path = None, str(Path(storage_dir).resolve())
    storage_name = storage.join(storage.redact(str(storage_path if storage_fs is None else storage_dir)), name)
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"train": train_cfg.to_dict(), "classes": list(classes), "image_size": section.image_size,
                           "role": role, "init_checkpoint": None if init_checkpoint is None else str(init_checkpoint),
                           "selection": section.selection, "selection_tolerance": section.selection_tolerance,
                           "distill": section.distill if distill_from is not None else 0.0,
                           "distill_from": None if distill_from is None else str(distill_from)},
        scaling_config=ScalingConfig(num_workers=section.num_workers, use_gpu=section.use_gpu,
                                     resources_per_worker={"CPU": 1}),
        datasets={"train": train_ds, "val": val_ds},
        dataset_config=_data_config(),
        run_config=RunConfig(name=name, storage_path=storage_path, storage_filesystem=storage_fs,
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=2)),
    )
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
            # 0: trained from scratch; k: resumed after epoch k from a checkpoint of an earlier run
            "resumed_from_epoch": int(metrics.get("start_epoch", 0)),
            "wall_s": round(time.time() - t0, 2)}
