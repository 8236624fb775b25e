import dataclasses
import hashlib

import numpy as np
import pytest
import torch

from plabel.method.unet import (
    CheckpointError,
    UNet,
    UNetConfig,
    check_starting_point,
    checkpoint_sha256,
    load_checkpoint,
    predict_probs,
    save_checkpoint,
    starting_point_differences,
)


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_odd_sizes_keep_shape(norm):
    torch.manual_seed(0)
    model = UNet(in_channels=1, num_classes=3, base_channels=4, depth=3, norm=norm).eval()
    out = model(torch.rand(2, 1, 37, 50))
    assert out.shape == (2, 3, 37, 50) and out.dtype == torch.float32


def test_config_round_trip():
    cfg = UNetConfig(in_channels=1, num_classes=4, base_channels=8, depth=3)
    assert UNetConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="bogus"):
        UNetConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    cfg = UNetConfig(num_classes=2, base_channels=4, depth=2)
    model = UNet.from_config(cfg)
    model.train()
    model(torch.rand(2, 1, 16, 16))          # move the BatchNorm running stats
    model.eval()
    x = torch.rand(1, 1, 19, 23)
    path = tmp_path / "sub" / "teacher.pt"
    save_checkpoint(path, model, cfg, {"epoch": 3, "dice": [0.9, 0.8], "tag": None})
    assert [p.name for p in path.parent.iterdir()] == ["teacher.pt"]   # no temp left
    torch.load(path, weights_only=True)                               # plain contents
    loaded, cfg2, extra = load_checkpoint(path)
    assert cfg2 == cfg and extra == {"epoch": 3, "dice": [0.9, 0.8], "tag": None}
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert checkpoint_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_intensity_is_saved_and_old_checkpoints_load_as_fixed(tmp_path):
    cfg = UNetConfig(num_classes=2, base_channels=4, depth=1, intensity="minmax")
    model = UNet.from_config(cfg)
    assert model.config.intensity == "minmax"
    save_checkpoint(tmp_path / "m.pt", model, cfg)
    assert load_checkpoint(tmp_path / "m.pt")[1].intensity == "minmax"
    # a checkpoint written before the key existed: its config has no 'intensity'; it read gray / 255
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    del payload["config"]["intensity"]
    torch.save(payload, tmp_path / "old.pt")
    assert load_checkpoint(tmp_path / "old.pt")[1] == UNetConfig(num_classes=2, base_channels=4, depth=1)
    assert load_checkpoint(tmp_path / "old.pt")[1].intensity == "fixed"
    with pytest.raises(ValueError, match="UNetConfig.intensity must be one of .*'clahe'"):
        UNetConfig(intensity="clahe")


def test_a_starting_point_must_fit_the_unet_that_starts_from_it():
    """init (its weights) needs every architecture field equal; distil (its probabilities) needs the
    classes and the intensity; intensity is checked first, with its own message; the others are
    named with both values."""
    want = UNetConfig(num_classes=5, base_channels=8, depth=3, intensity="minmax")
    check_starting_point("t.pt", want, want, "init", "student")
    smaller = UNetConfig(num_classes=5, base_channels=4, depth=2, norm="group", intensity="minmax")
    check_starting_point("t.pt", smaller, want, "distill", "student")  # its probabilities still fit
    assert starting_point_differences(smaller, want, "distill") == []
    assert starting_point_differences(smaller, want, "init") == ["base_channels", "depth", "norm"]
    fixed7 = UNetConfig(num_classes=7, base_channels=8, depth=3)
    assert starting_point_differences(fixed7, want, "init") == ["intensity", "num_classes"]
    with pytest.raises(CheckpointError, match=r"^t.pt was trained with intensity fixed, this teacher with minmax; .*"
                                              r"cannot distil from it$"):
        check_starting_point("t.pt", fixed7, want, "distill", "teacher")
    with pytest.raises(CheckpointError, match=r"^t.pt: its U-Net differs from the student's in num_classes "
                                              r"\(7 against 5\); cannot distil from it$"):
        check_starting_point("t.pt", dataclasses.replace(fixed7, intensity="minmax"), want, "distill", "student")
    with pytest.raises(CheckpointError, match=r"^t.pt: its U-Net differs from the teacher's in base_channels "
                                              r"\(4 against 8\), depth \(2 against 3\), norm \(group against "
                                              r"batch\); cannot start"):
        check_starting_point("t.pt", smaller, want, "init", "teacher")
    with pytest.raises(ValueError, match="'soup'"):
        check_starting_point("t.pt", want, want, "soup", "student")


def test_extra_must_be_plain(tmp_path):
    cfg = UNetConfig(num_classes=1, base_channels=4, depth=1)
    with pytest.raises(TypeError, match="ndarray"):
        save_checkpoint(tmp_path / "x.pt", UNet.from_config(cfg), cfg, {"a": np.zeros(2)})


class _NeedsPickle:
    pass


def test_pickle_checkpoint_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "plabel-unet-v1", "obj": _NeedsPickle()}, path)
    with pytest.raises(ValueError, match="pickle") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_predict_probs():
    torch.manual_seed(0)
    model = UNet(num_classes=2, base_channels=4, depth=2)
    model.train()
    images = np.random.default_rng(0).random((5, 13, 17), dtype=np.float32)
    p = predict_probs(model, images, batch_size=2)
    assert p.shape == (5, 2, 13, 17) and p.dtype == np.float32
    assert p.min() >= 0 and p.max() <= 1
    assert model.training                    # mode restored
    np.testing.assert_allclose(predict_probs(model, images, batch_size=5), p, atol=1e-6)
    pt = predict_probs(model, images, tta=True)
    assert pt.shape == p.shape and not np.allclose(pt, p)
    with pytest.raises(ValueError, match=r"\(5, 1, 13, 17\)"):
        predict_probs(model, images[:, None])
