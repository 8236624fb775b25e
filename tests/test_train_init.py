"""`plabel train --init-from`: a U-Net that starts from another checkpoint's weights (the student
from its teacher, student.init: teacher in `plabel run`), through Ray Train."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from plabel.cli.main import app
from plabel.data.ingest import ingest, make_splits
from plabel.data.synthetic import SYNTHETIC_CLASSES, make_synthetic_dataset
from plabel.jobs.train_job import train_unet
from plabel.method.unet import CheckpointError, UNet, UNetConfig, load_checkpoint, save_checkpoint
from plabel.schemas.config import TrainSection, build
from plabel.training.loop import TrainConfig, build_model

ARCH = ["--image-size", "32", "--base-channels", "4", "--depth", "2", "--batch-size", "2"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("init")
    make_synthetic_dataset(root / "data", n_images=8, size=32, seed=5)
    ingest(root / "data", root / "shards", {"labelled": 4, "val": 2}, seed=0, shard_size=4)
    # the checkpoint to start from: a U-Net of ARCH's shape with weights of another seed than the
    # loop's own (seed 0), saved as `plabel train` saves one (no Ray Train run needed to make it)
    cfg = UNetConfig(in_channels=1, num_classes=len(SYNTHETIC_CLASSES), base_channels=4, depth=2)
    torch.manual_seed(123)
    save_checkpoint(root / "t.pt", UNet.from_config(cfg), cfg)
    return root


def train(root, out, *extra):
    r = CliRunner().invoke(app, ["train", "--shards", str(root / "shards"), "--out", str(root / out), *ARCH, *extra],
                           catch_exceptions=False)
    return r


def result(output: str) -> dict:
    """The JSON summary `plabel train` prints last (Ray's own log lines may come before it)."""
    start = output.rfind("\n{\n") + 1
    return json.JSONDecoder().raw_decode(output[start:])[0]


def params(path):
    return dict(load_checkpoint(path)[0].named_parameters())


def test_init_from_starts_at_the_checkpoints_weights(shards, monkeypatch):
    root = shards
    # --init-from relative to the user's working directory, which Ray Train's worker does not share
    # (it runs in its own directory): train_unet hands the worker an absolute path
    monkeypatch.chdir(root)
    # a learning rate of 1e-12 leaves the weights where training started (BatchNorm statistics move)
    r = train(root, "warm.pt", "--epochs", "1", "--lr", "1e-12", "--init-from", "t.pt")
    assert r.exit_code == 0, r.output
    assert load_checkpoint(root / "warm.pt")[1].intensity == "fixed"  # t.pt's, not the default minmax
    t, warm = params(root / "t.pt"), params(root / "warm.pt")
    assert all(torch.allclose(warm[k], t[k], rtol=0, atol=1e-8) for k in t)
    # and not because every run starts there: the loop's own fresh U-Net (seed 0, what a run without
    # --init-from starts from) is far from t.pt
    fresh = dict(build_model(TrainConfig(base_channels=4, depth=2, seed=0), len(t["head.bias"]))[0].named_parameters())
    assert not all(torch.allclose(fresh[k], t[k], rtol=0, atol=1e-3) for k in t)


def test_init_from_another_architecture_is_refused_before_training(shards):
    root = shards
    r = CliRunner().invoke(app, ["train", "--shards", str(root / "shards"), "--out", str(root / "bad.pt"),
                                 "--image-size", "32", "--base-channels", "8", "--depth", "2", "--epochs", "1",
                                 "--init-from", str(root / "t.pt")])
    assert r.exit_code != 0
    assert str(root / "t.pt") in r.output and "differs from the teacher's in base_channels (4 against 8)" in r.output
    assert "cannot start from its weights (--init-from, --base-channels 8)" in r.output  # only what differs
    assert "logs:" not in r.output and not (root / "bad.pt").exists()  # the CLI's check: before Ray starts
    r = CliRunner().invoke(app, ["train", "--shards", str(root / "shards"), "--out", str(root / "bad.pt"), *ARCH,
                                 "--epochs", "1", "--init-from", str(root / "missing.pt")])
    assert r.exit_code != 0 and "missing.pt" in r.output


@pytest.fixture(scope="module")
def lost_class(tmp_path_factory, ray_local):
    """A dataset on which warm-started training gains on the mean but must lose a class, and the
    weights to start from.

    Every class covers every whole labelled image; on the validation images every class but the
    last covers the whole image and the last is absent. The starting U-Net's head has zero weights
    and bias -1: it predicts nothing, so its validation Dice is 0 for the first classes and 1 for
    the last (truth and prediction both empty). Trained without augmentation (no zero-padded
    borders) every pixel of every batch asks for every class, so each AdamW step raises the head's
    biases (the first by exactly lr) and its weights, which read ReLU features (>= 0): with lr 2
    every class covers every validation pixel after the first step: Dice 1 for the first classes
    (a better mean) and 0 for the last (a lost class)."""

    root = tmp_path_factory.mktemp("lost")
    data = make_synthetic_dataset(root / "data", n_images=8, size=32, seed=5)
    counts = {"labelled": 4, "val": 2}
    splits = make_splits(sorted(p.stem for p in (data / "images").glob("*.png")), counts, seed=0)  # ingest's
    full, empty = np.full((32, 32), 255, np.uint8), np.zeros((32, 32), np.uint8)
    for i in splits["labelled"] + splits["val"]:
        for c in SYNTHETIC_CLASSES:
            lost = c == SYNTHETIC_CLASSES[-1] and i in splits["val"]
            assert cv2.imwrite(str(data / "masks" / c / f"{i}.png"), empty if lost else full)
    ingest(data, root / "shards", counts, seed=0, shard_size=4)
    cfg = UNetConfig(in_channels=1, num_classes=len(SYNTHETIC_CLASSES), base_channels=4, depth=2)
    torch.manual_seed(0)
    start = UNet.from_config(cfg)
    with torch.no_grad():
        start.head.weight.zero_()
        start.head.bias.fill_(-1.0)
    save_checkpoint(root / "start.pt", start, cfg)
    return root


def test_guarded_selection_keeps_the_starting_weights_when_training_loses_a_class(lost_class):
    """--selection guarded (the default) with --init-from: the starting weights are measured on the
    validation images first; training that raises the mean but loses a class in every epoch (see
    ``lost_class``) gives the starting weights back (best_epoch -1, buffers included).
    --selection mean keeps a trained epoch."""
    root = lost_class
    run = ("--epochs", "2", "--lr", "2.0", "--no-augment", "--init-from", str(root / "start.pt"))
    r = train(root, "guarded.pt", *run)
    assert r.exit_code == 0, r.output
    assert result(r.output)["best_epoch"] == -1
    start, g = load_checkpoint(root / "start.pt"), load_checkpoint(root / "guarded.pt")
    ss = start[0].state_dict()
    assert all(torch.equal(v, ss[k]) for k, v in g[0].state_dict().items())  # buffers included
    assert g[2]["selection"] == "guarded" and g[2]["epoch"] == -1
    assert g[2]["val_dice_per_class"] == [0.0, 0.0, 0.0, 1.0]  # the starting weights' validation Dice
    r = train(root, "mean.pt", *run, "--selection", "mean")
    assert r.exit_code == 0, r.output
    assert result(r.output)["best_epoch"] in (0, 1)
    m = load_checkpoint(root / "mean.pt")
    assert m[2]["val_dice_per_class"] == [1.0, 1.0, 1.0, 0.0]  # a better mean, the last class lost
    assert bool((m[0].head.bias > 0).all())
    r = train(root, "bad.pt", "--epochs", "1", "--selection", "best")
    assert r.exit_code == 2 and "(--selection)" in r.output and "'best'" in r.output


def test_a_student_reads_images_as_the_checkpoint_it_starts_from(shards):
    """t.pt was trained with intensity fixed (the key's default): --init-from it trains a fixed U-Net
    (test_init_from_starts_at_the_checkpoints_weights); asking for minmax is refused before training,
    naming the file and both settings."""
    root = shards
    assert load_checkpoint(root / "t.pt")[1].intensity == "fixed"
    r = train(root, "mm.pt", "--epochs", "1", "--init-from", str(root / "t.pt"), "--intensity", "minmax")
    assert r.exit_code != 0
    assert str(root / "t.pt") in r.output and "intensity fixed, this teacher with minmax" in r.output
    assert "(--init-from, --intensity minmax)" in r.output and not (root / "mm.pt").exists()
    r = train(root, "bad.pt", "--epochs", "1", "--intensity", "gamma")
    assert r.exit_code == 2 and "(--intensity)" in r.output and "'gamma'" in r.output


def test_distill_from_a_teacher_of_other_classes_is_refused_before_training(shards):
    """The CLI applies train_unet's rule (plabel.method.unet.check_starting_point) before Ray starts."""
    root = shards
    other = UNetConfig(in_channels=1, num_classes=7, base_channels=4, depth=2)
    save_checkpoint(root / "other.pt", UNet.from_config(other), other)
    r = train(root, "d.pt", "--epochs", "1", "--distill-from", str(root / "other.pt"))
    assert r.exit_code != 0
    assert str(root / "other.pt") in r.output and "in num_classes (7 against 4); cannot distil" in r.output
    assert f"cannot distil from it (--distill-from, --shards {root / 'shards'})" in r.output  # the CLI's check
    assert "logs:" not in r.output and not (root / "d.pt").exists()


def test_train_unet_refuses_a_starting_point_that_does_not_fit_before_ray_starts(tmp_path):
    """`plabel run`'s stages call train_unet without the CLI's check: the same rule, no datasets read."""
    cfg = UNetConfig(in_channels=1, num_classes=2, base_channels=4, depth=2, intensity="minmax")
    save_checkpoint(tmp_path / "t.pt", UNet.from_config(cfg), cfg)
    section = build(TrainSection, {"epochs": 1, "base_channels": 4, "depth": 3}, "student")
    kw = dict(train_ds=None, val_ds=None, section=section, out_path=tmp_path / "s.pt", storage_dir=tmp_path, name="s",
              role="student")
    with pytest.raises(CheckpointError, match=r"t.pt: its U-Net differs from the student's in depth \(2 against 3\)"):
        train_unet(classes=["a", "b"], init_checkpoint=str(tmp_path / "t.pt"), **kw)
    with pytest.raises(CheckpointError, match=r"t.pt: .* in num_classes \(2 against 3\); cannot distil from it$"):
        train_unet(classes=["a", "b", "c"], distill_from=str(tmp_path / "t.pt"), **kw)


def test_the_same_training_twice_gives_the_same_weights(tmp_path_factory, ray_local):
    """Ray Data does not fix the order of blocks unless asked: the training set is materialized and
    fed to the workers in order (preserve_order) and the local shuffle is seeded, so a run with the
    same seed is reproducible. Several shards of 4 images, so block order matters."""
    root = tmp_path_factory.mktemp("repro")
    make_synthetic_dataset(root / "data", n_images=24, size=32, seed=5)
    ingest(root / "data", root / "shards", {"labelled": 18, "val": 2}, seed=0, shard_size=4)
    for k in range(2):
        r = train(root, f"t{k}.pt", "--epochs", "2", "--storage", str(root / f"ray_train{k}"))
        assert r.exit_code == 0, r.output
    a, b = params(root / "t0.pt"), params(root / "t1.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert load_checkpoint(root / "t0.pt")[1].intensity == "minmax"  # the default, recorded
    # not equal because nothing moved: both left the loop's seed-0 starting weights far behind
    fresh = dict(build_model(TrainConfig(base_channels=4, depth=2, seed=0), len(a["head.bias"]))[0].named_parameters())
    assert not all(torch.allclose(fresh[k], a[k], rtol=0, atol=1e-3) for k in a)
