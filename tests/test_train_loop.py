"""One training loop: the Ray Train worker of `plabel train` / `plabel run` (plabel.jobs.train_job) and
the in-process fit_unet (plabel.training.inprocess) both run plabel.training.loop.fit. Fed the same
batches (one worker, its shard in order: preserve_order, no shuffle), they give the same losses,
validation Dice and weights, bit for bit."""
from __future__ import annotations

import numpy as np
import ray
import torch
from ray.train import CheckpointConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from plabel.jobs.train_job import MODEL_FILE, _data_config, _train_loop, in_worker_memory
from plabel.method.unet import load_checkpoint
from plabel.training.inprocess import fit_unet
from plabel.training.loop import TrainConfig


def _data(n=10, size=16, seed=0):
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, 2, size, size), np.uint8)
    for i in range(n):
        y, x = rng.integers(1, size // 2, 2)
        masks[i, 0, y:y + 6, x:x + 6] = 1
        masks[i, 1, y + 3:y + 8, x + 2:x + 7] = 1
    images = (0.1 + 0.3 * masks[:, 0] + 0.4 * masks[:, 1] + 0.02 * rng.standard_normal((n, size, size))).clip(0, 1)
    weight = np.ones((n, 2), np.float32)
    weight[[1, 4], 1] = 0  # two samples without a class-1 label: they count neither way
    return images.astype(np.float32), masks, weight


def _worker_fit(tmp_path, name: str, cfg: TrainConfig, n_train: int = 8, **config):
    """_train_loop run by a 1-worker TorchTrainer, as train_unet runs it, on _data()'s first n_train rows
    (validation: the rest), threads 1 (fit_unet's comparisons run at 1 thread too, for bit-equal sums);
    ``config``: more train_loop_config entries."""
    images, masks, weight = _data()
    rows = [{"image": images[i], "masks": masks[i], "weight": weight[i]} for i in range(len(images))]
    train_ds = ray.data.from_items(rows[:n_train]).materialize()
    val_ds = ray.data.from_items(rows[n_train:]).materialize()
    return TorchTrainer(
        _train_loop, train_loop_config={"train": cfg.to_dict(), "classes": ["a", "b"], "image_size": 16,
                                        "role": "teacher", "threads": 1, **config},
        scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
        datasets={"train": train_ds, "val": val_ds}, dataset_config=_data_config(),
        run_config=RunConfig(name=name, storage_path=str(tmp_path), checkpoint_config=CheckpointConfig())).fit()


def test_the_ray_worker_and_fit_unet_run_the_same_loop(tmp_path, ray_local):
    images, masks, weight = _data()
    n_train = 8  # 4 batches of 2; augmentation on: both draw it from the rank-0 generator
    cfg = TrainConfig(epochs=3, batch_size=2, base_channels=4, depth=1, lr=5e-3, seed=4, shuffle=False)
    result = _worker_fit(tmp_path, "same-loop", cfg, n_train)
    assert result.error is None
    reported = sorted((m for _, m in result.best_checkpoints), key=lambda m: m["epoch"])
    with result.checkpoint.as_directory() as d:
        state = torch.load(f"{d}/state.pt", weights_only=True)
        kept, _, meta = load_checkpoint(f"{d}/{MODEL_FILE}")

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the worker (threads 1)
    try:
        local = fit_unet(images[:n_train], masks[:n_train], cfg, weight=weight[:n_train],
                         val_images=images[n_train:], val_masks=masks[n_train:])
        free = fit_unet(images[:n_train], masks[:n_train], TrainConfig(**{**cfg.to_dict(), "shuffle": True}),
                        weight=weight[:n_train], val_images=images[n_train:], val_masks=masks[n_train:])
    finally:
        torch.set_num_threads(threads)

    assert [m["epoch"] for m in reported] == [0, 1, 2] and state["epoch"] == 2
    assert [m["loss"] for m in reported] == [h["loss"] for h in local.history]
    assert [m["val_dice"] for m in reported] == [h["val_dice"] for h in local.history]
    assert all(np.isfinite(h["loss"]) and h["loss"] > 0 for h in local.history)
    assert meta["epoch"] == local.best_epoch and meta["val_dice"] == local.best_val_dice
    assert meta["val_dice_per_class"] == local.history[local.best_epoch]["val_dice_per_class"]
    for k, v in local.model.state_dict().items():
        assert torch.equal(kept.state_dict()[k], v), k
    # and the running weights after the last epoch: the kept ones only if the last epoch was the best
    assert torch.equal(state["model"]["head.weight"], kept.head.weight) == (local.best_epoch == 2)
    # the same loop with its per-epoch shuffle trains otherwise (the comparison above is not vacuous)
    assert [h["loss"] for h in free.history] != [h["loss"] for h in local.history]
    assert not torch.equal(free.model.head.weight, local.model.head.weight)


def test_an_in_memory_worker_trains_as_fit_unet_with_its_shuffle(tmp_path, ray_local):
    """A small materialized training set (in_worker_memory) is read into the worker once and shuffled
    each epoch as fit_unet shuffles (loop.array_batches): the same losses, validation Dice and kept
    weights as fit_unet with its per-epoch shuffle on."""
    images, masks, weight = _data()
    cfg = TrainConfig(epochs=3, batch_size=2, base_channels=4, depth=1, lr=5e-3, seed=4, shuffle=True)
    rows = [{"image": images[i], "masks": masks[i], "weight": weight[i]} for i in range(8)]
    materialized = ray.data.from_items(rows).materialize()
    # materialized: read into memory; lazy (one more transform): streamed
    assert in_worker_memory(materialized) and not in_worker_memory(materialized.map_batches(lambda b: b))
    result = _worker_fit(tmp_path, "in-memory", cfg, in_memory=True)
    assert result.error is None
    reported = sorted((m for _, m in result.best_checkpoints), key=lambda m: m["epoch"])
    with result.checkpoint.as_directory() as d:
        kept, _, meta = load_checkpoint(f"{d}/{MODEL_FILE}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the worker (threads 1)
    try:
        local = fit_unet(images[:8], masks[:8], cfg, weight=weight[:8], val_images=images[8:], val_masks=masks[8:])
    finally:
        torch.set_num_threads(threads)
    assert [m["loss"] for m in reported] == [h["loss"] for h in local.history]
    assert [m["val_dice"] for m in reported] == [h["val_dice"] for h in local.history]
    assert meta["epoch"] == local.best_epoch
    for k, v in local.model.state_dict().items():
        assert torch.equal(kept.state_dict()[k], v), k


def test_checkpoint_due_first_last_and_every_s():
    """The first epoch of a call (fresh or resumed) and the last always report; between them only
    when checkpoint_every_s has passed since the last report; 0: every epoch."""
    from plabel.jobs.train_job import checkpoint_due
    assert checkpoint_due(0, 0, 10, None, 0.0, 30.0)  # the first epoch
    assert not checkpoint_due(1, 0, 10, 100.0, 129.9, 30.0)
    assert checkpoint_due(1, 0, 10, 100.0, 130.0, 30.0)
    assert checkpoint_due(9, 0, 10, 100.0, 100.5, 30.0)  # the last epoch
    assert checkpoint_due(4, 4, 10, None, 0.0, 30.0)  # the first epoch of a resumed run
    assert all(checkpoint_due(e, 0, 10, 5.0, 5.0, 0.0) for e in range(10))


def test_sparse_checkpoints_train_the_same_weights(tmp_path, ray_local):
    """checkpoint_every_s far above the run: Ray Train gets the first and the last epoch only, and the
    kept weights are those of the run that reports every epoch (reporting is not training)."""
    cfg = TrainConfig(epochs=3, batch_size=2, base_channels=4, depth=1, lr=5e-3, seed=4, shuffle=False)
    out = {}
    for every_s in (0.0, 3600.0):
        result = _worker_fit(tmp_path, f"every-{every_s}", cfg, checkpoint_every_s=every_s)
        assert result.error is None
        with result.checkpoint.as_directory() as d:
            kept, _, meta = load_checkpoint(f"{d}/{MODEL_FILE}")
        out[every_s] = (sorted(m["epoch"] for _, m in result.best_checkpoints), kept.state_dict(), meta["epoch"])
    assert out[0.0][0] == [0, 1, 2] and out[3600.0][0] == [0, 2]
    assert out[0.0][2] == out[3600.0][2]
    for k, v in out[0.0][1].items():
        assert torch.equal(out[3600.0][1][k], v), k


def test_two_workers_report_together(tmp_path, ray_local):
    """With two Ray Train workers rank 0's clock decides each report for both (a broadcast over the
    workers' process group): Ray Train needs the same reports from every worker, or it hangs. Here
    the run finishes and reports the first and the last epoch only."""
    images, masks, weight = _data()
    cfg = TrainConfig(epochs=3, batch_size=2, base_channels=4, depth=1, lr=5e-3, seed=4, shuffle=False)
    rows = [{"image": images[i], "masks": masks[i], "weight": weight[i]} for i in range(len(images))]
    result = TorchTrainer(
        _train_loop, train_loop_config={"train": cfg.to_dict(), "classes": ["a", "b"], "image_size": 16,
                                        "role": "teacher", "threads": 1, "checkpoint_every_s": 3600.0},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        datasets={"train": ray.data.from_items(rows[:8]).materialize(),
                  "val": ray.data.from_items(rows[8:]).materialize()}, dataset_config=_data_config(),
        run_config=RunConfig(name="two", storage_path=str(tmp_path), checkpoint_config=CheckpointConfig())).fit()
    assert result.error is None
    assert sorted(m["epoch"] for _, m in result.best_checkpoints) == [0, 2]
