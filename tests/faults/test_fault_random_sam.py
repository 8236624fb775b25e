"""The `random_tiny` SAM backend the fault tests and the soak run use: no checkpoint, reproducible,
fast, refused with a checkpoint, and it goes through the refiner like any backend."""
import numpy as np
import pytest
import torch

from plabel.method.prompts import RefinementPrompts
from plabel.method.sam import RANDOM_BACKENDS, SamRefiner, load_sam
from plabel.schemas.config import ConfigError, LabelSection, build


def test_random_tiny_loads_without_checkpoint_and_is_reproducible():
    a, b = load_sam("random_tiny"), load_sam("random_tiny")
    assert "random_tiny" in RANDOM_BACKENDS
    assert a.backend == "random_tiny" and a.checkpoint_sha256 == "random_tiny-seed-0" and a.img_size == 64
    for x, y in zip(a.sam.state_dict().values(), b.sam.state_dict().values()):
        assert torch.equal(x, y)
    with pytest.raises(ValueError, match="takes no checkpoint"):
        load_sam("random_tiny", "/some/sam.pth")


def test_random_tiny_refines_a_batch():
    refiner = SamRefiner(load_sam("random_tiny"), stages=(("box",), ("points", "mask")))
    image = np.zeros((48, 40, 3), np.uint8)
    image[10:30, 8:30] = 200
    prompts = RefinementPrompts(boxes=np.array([[8, 10, 29, 29], [0, 0, 0, 0]], np.float32),
                                points=np.array([[[15, 20], [2, 2]], [[2, 2], [15, 20]]], np.float32),
                                point_labels=np.array([[1, 0], [-1, -1]], np.int32), valid=np.array([True, False]))
    (res,) = refiner.refine_batch([image], [prompts])
    assert res.masks.shape == (2, 48, 40) and not res.masks[1].any()


def test_config_refuses_a_checkpoint_for_random_weights():
    assert build(LabelSection, {"sam": {"backend": "random_tiny"}}, "label").sam.backend == "random_tiny"
    with pytest.raises(ConfigError, match="label.sam.checkpoint"):
        build(LabelSection, {"sam": {"backend": "random_tiny", "checkpoint": "x.pth"}}, "label")
