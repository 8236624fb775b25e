"""`plabel train --init-from`: a U-Net that starts from another checkpoint's weights (the student
from its teacher, student.init: teacher in `plabel run`), through Ray Train."""
from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from engine.ingest import ingest
from engine.synthetic import make_synthetic_dataset
from engine.unet import load_checkpoint

ARCH = ["--image-size", "32", "--base-channels", "4", "--depth", "2", "--batch-size", "2"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("init")
    make_synthetic_dataset(root / "data", n_images=8, size=32, seed=5)
    ingest(root / "data", root / "shards", {"labelled": 4, "val": 2}, seed=0, shard_size=4)
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


def test_init_from_starts_at_the_checkpoints_weights(shards):
    root = shards
    assert train(root, "t.pt", "--epochs", "2", "--lr", "0.01").exit_code == 0
    # a learning rate of 1e-12 leaves the weights where training started (BatchNorm statistics move)
    r = train(root, "warm.pt", "--epochs", "1", "--lr", "1e-12", "--init-from", str(root / "t.pt"))
    assert r.exit_code == 0, r.output
    r = train(root, "fresh.pt", "--epochs", "1", "--lr", "1e-12")
    assert r.exit_code == 0, r.output
    t, warm, fresh = params(root / "t.pt"), params(root / "warm.pt"), params(root / "fresh.pt")
    assert all(torch.allclose(warm[k], t[k], rtol=0, atol=1e-8) for k in t)
    assert not all(torch.allclose(fresh[k], t[k], rtol=0, atol=1e-3) for k in t)


def test_init_from_another_architecture_is_refused_before_training(shards):
    root = shards
    if not (root / "t.pt").exists():
        assert train(root, "t.pt", "--epochs", "1").exit_code == 0
    r = CliRunner().invoke(app, ["train", "--shards", str(root / "shards"), "--out", str(root / "bad.pt"),
                                 "--image-size", "32", "--base-channels", "8", "--depth", "2", "--epochs", "1",
                                 "--init-from", str(root / "t.pt")])
    assert r.exit_code != 0
    assert str(root / "t.pt") in r.output and "base_channels 4" in r.output and "base_channels 8" in r.output
    assert not (root / "bad.pt").exists()
    r = CliRunner().invoke(app, ["train", "--shards", str(root / "shards"), "--out", str(root / "bad.pt"), *ARCH,
                                 "--epochs", "1", "--init-from", str(root / "missing.pt")])
    assert r.exit_code != 0 and "missing.pt" in r.output


def test_guarded_selection_keeps_the_starting_weights_when_training_loses_a_class(shards):
    """--selection guarded (the default) with --init-from: the starting weights are measured on the
    validation images first; a learning rate that wrecks the model loses classes in every epoch, so
    the starting weights come back (best_epoch -1). --selection mean keeps a trained epoch."""
    root = shards
    if not (root / "t.pt").exists():
        assert train(root, "t.pt", "--epochs", "2", "--lr", "0.01").exit_code == 0
    r = train(root, "guarded.pt", "--epochs", "2", "--lr", "5.0", "--init-from", str(root / "t.pt"))
    assert r.exit_code == 0, r.output
    assert result(r.output)["best_epoch"] == -1
    t, g = load_checkpoint(root / "t.pt"), load_checkpoint(root / "guarded.pt")
    ts = t[0].state_dict()
    assert all(torch.equal(v, ts[k]) for k, v in g[0].state_dict().items())  # buffers included
    assert g[2]["selection"] == "guarded" and len(g[2]["val_dice_per_class"]) == len(g[2]["classes"])
    r = train(root, "mean.pt", "--epochs", "2", "--lr", "5.0", "--init-from", str(root / "t.pt"),
              "--selection", "mean")
    assert r.exit_code == 0, r.output
    assert result(r.output)["best_epoch"] in (0, 1)
    r = train(root, "bad.pt", "--epochs", "1", "--selection", "best")
    assert r.exit_code != 0 and "train.selection" in r.output and "'best'" in r.output


def test_distill_from_a_teacher_of_other_classes_is_refused_before_training(shards):
    from engine.unet import UNet, UNetConfig, save_checkpoint

    root = shards
    other = UNetConfig(in_channels=1, num_classes=7, base_channels=4, depth=2)
    save_checkpoint(root / "other.pt", UNet.from_config(other), other)
    r = train(root, "d.pt", "--epochs", "1", "--distill-from", str(root / "other.pt"))
    assert r.exit_code != 0
    assert str(root / "other.pt") in r.output and "7 classes" in r.output and "cannot distil" in r.output
    assert not (root / "d.pt").exists()
