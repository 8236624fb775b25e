"""engine.inprocess: in-process U-Net fitting with best-validation selection, and several SAM
stage sets from one encoder pass (tiny models, a few seconds on one CPU thread)."""
import numpy as np
import pytest
import torch

from engine.inprocess import fit_unet, positive_fraction, refine_variants
from engine.prompts import extract_prompts
from engine.sam import SamRefiner, build_random_sam
from engine.train_core import TrainConfig

torch.set_num_threads(1)


def _data(n=6, size=32, seed=0):
    rng = np.random.default_rng(seed)
    images = np.zeros((n, size, size), np.float32)
    masks = np.zeros((n, 2, size, size), np.uint8)
    for i in range(n):
        y, x = rng.integers(4, size // 2, 2)
        masks[i, 0, y:y + 10, x:x + 10] = 1
        masks[i, 1, y + 5:y + 14, x + 3:x + 12] = 1
        images[i] = 0.1 + 0.3 * masks[i, 0] + 0.4 * masks[i, 1] + 0.02 * rng.standard_normal((size, size))
    return images.clip(0, 1), masks


def test_fit_is_deterministic_and_keeps_the_best_validation_epoch():
    images, masks = _data()
    cfg = TrainConfig(epochs=4, batch_size=2, base_channels=4, depth=2, lr=5e-3, seed=3)
    seen = []
    a = fit_unet(images[:4], masks[:4], cfg, val_images=images[4:], val_masks=masks[4:], progress=seen.append)
    b = fit_unet(images[:4], masks[:4], cfg, val_images=images[4:], val_masks=masks[4:])
    assert len(seen) == 4 and [h["epoch"] for h in a.history] == [0, 1, 2, 3]
    vals = [h["val_dice"] for h in a.history]
    assert a.best_epoch == int(np.argmax(vals)) and a.best_val_dice == pytest.approx(max(vals))
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k]), k
    assert not a.model.training
    # the returned weights are those of the best epoch: their validation Dice is the recorded one
    from engine.train_core import evaluate_batch

    d = evaluate_batch(a.model, torch.from_numpy(images[4:])[:, None], torch.from_numpy(masks[4:]).float())
    assert float(d.mean()) == pytest.approx(a.best_val_dice, abs=1e-6)


def test_fit_without_validation_keeps_the_last_epoch_and_checks_shapes():
    images, masks = _data(n=3)
    cfg = TrainConfig(epochs=2, batch_size=2, base_channels=4, depth=1, augment=False)
    r = fit_unet(images, masks, cfg, weight=np.array([[1, 0], [1, 1], [0, 1]], np.float32))
    assert r.best_epoch == 1 and r.best_val_dice is None
    with pytest.raises(ValueError, match="weight"):
        fit_unet(images, masks, cfg, weight=np.ones((3, 3)))
    with pytest.raises(ValueError, match="do not fit"):
        fit_unet(images[:2], masks, cfg)


def test_positive_fraction_ignores_weight_zero_classes():
    masks = np.zeros((2, 2, 4, 4), np.uint8)
    masks[0, 0] = 1  # all positive, but weight 0 below
    masks[1, 0, :2] = 1
    w = np.array([[0, 1], [1, 1]], np.float32)
    p = positive_fraction(masks, w)
    assert p[0] == pytest.approx(0.5) and p[1] == pytest.approx(1e-4)


def test_refine_variants_equals_each_refiners_refine_batch():
    sam = build_random_sam(seed=2)
    rng = np.random.default_rng(0)
    images, prompts = [], []
    for i, (h, w) in enumerate([(60, 80), (72, 64), (50, 50)]):
        m = np.zeros((3, h, w), bool)
        if i != 2:  # the last image has no class: not encoded, empty results
            m[0, 5:30, 5:40] = True
            m[1, 20:45, 30:60] = True
            m[2, 10:20, 10:25] = i == 0
        images.append(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        prompts.append(extract_prompts(m))
    refiners = {"paper": SamRefiner(sam, stages=(("box",), ("points", "mask"))),
                "box_mask": SamRefiner(sam, stages=(("box",), ("box", "mask"))),
                "box": SamRefiner(sam, stages=(("box",),))}
    calls = []
    hook = sam.sam.image_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        got = refine_variants(refiners, images, prompts)
    finally:
        hook.remove()
    assert len(calls) == 1
    for name, r in refiners.items():
        want = r.refine_batch(images, prompts)
        for g, x in zip(got[name], want):
            assert np.array_equal(g.masks, x.masks)
            np.testing.assert_allclose(g.iou_pred, x.iou_pred, rtol=0, atol=1e-6, equal_nan=True)
            for gs, xs in zip(g.stage_masks, x.stage_masks):
                assert np.array_equal(gs, xs)
    assert not got["paper"][2].masks.any() and np.isnan(got["paper"][2].iou_pred).all()
    # stage 1 is the same box prompt in every variant
    assert np.array_equal(got["paper"][0].stage_masks[0], got["box"][0].masks)
    with pytest.raises(ValueError, match="another SAM"):
        refine_variants({"a": refiners["box"], "b": SamRefiner(build_random_sam(seed=5))}, images, prompts)


def test_fit_warm_start_begins_at_the_given_weights():
    """init_state: training starts from those weights (lr 0 keeps them; BatchNorm statistics still
    move), not from the seed's fresh U-Net; another architecture's weights are refused."""
    images, masks = _data(n=4)
    cfg = TrainConfig(epochs=3, batch_size=2, base_channels=4, depth=2, lr=5e-3, seed=1)
    teacher = fit_unet(images, masks, cfg).model
    frozen = TrainConfig(epochs=1, batch_size=2, base_channels=4, depth=2, lr=0.0, weight_decay=0.0, seed=2)
    warm = fit_unet(images, masks, frozen, init_state=teacher.state_dict()).model
    fresh = fit_unet(images, masks, frozen).model
    t, w, f = (dict(m.named_parameters()) for m in (teacher, warm, fresh))
    assert all(torch.equal(w[k], t[k]) for k in t)
    assert not all(torch.equal(f[k], t[k]) for k in t)
    moved = fit_unet(images, masks, TrainConfig(**{**frozen.to_dict(), "lr": 5e-3}), init_state=teacher.state_dict())
    assert not all(torch.equal(p, t[k]) for k, p in moved.model.named_parameters())
    other = TrainConfig(epochs=1, batch_size=2, base_channels=8, depth=2)
    with pytest.raises(RuntimeError, match="size mismatch"):
        fit_unet(images, masks, other, init_state=teacher.state_dict())
