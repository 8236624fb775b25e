"""plabel.training.inprocess: in-process U-Net fitting with best-validation selection, and several SAM
stage sets from one encoder pass (tiny models, a few seconds on one CPU thread)."""
import numpy as np
import pytest
import torch

from plabel.method.prompts import extract_prompts
from plabel.method.sam import SamRefiner, build_random_sam
from plabel.method.sam.variants import refine_variants
from plabel.training.inprocess import fit_unet
from plabel.training.loop import TrainConfig, evaluate_batch

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


def _val_dice(model, images, masks):
    return evaluate_batch(model, torch.from_numpy(images)[:, None], torch.from_numpy(masks).float()).mean(axis=0)


def test_guarded_selection_never_keeps_a_class_worse_than_the_starting_weights():
    """selection='guarded': the reference is the starting weights' per-class validation Dice; the kept
    weights lose no class by more than the tolerance; a destructive learning rate keeps the start."""
    images, masks = _data(n=10)
    teacher = fit_unet(images[:6], masks[:6], TrainConfig(epochs=15, batch_size=2, base_channels=4, depth=2,
                                                          lr=2e-2, seed=1, augment=False)).model
    images, masks = images[2:], masks[2:]  # 4 training images the teacher saw, 4 validation images it did not
    ref = _val_dice(teacher, images[4:], masks[4:])
    assert ref.min() > 0.6  # a teacher worth guarding
    # seed 3: a run with epochs of both sorts (whether a seed gives one is training noise)
    cfg = TrainConfig(epochs=4, batch_size=2, base_channels=4, depth=2, lr=5e-3, seed=3, augment=False)
    tol = 0.01
    g = fit_unet(images[:4], masks[:4], cfg, val_images=images[4:], val_masks=masks[4:],
                 init_state=teacher.state_dict(), selection="guarded", tolerance=tol)
    np.testing.assert_allclose(g.reference_val_dice, ref, atol=1e-9)
    kept = _val_dice(g.model, images[4:], masks[4:])
    assert np.all(kept >= ref - tol)
    for h in g.history:  # the recorded per-class Dice
        assert len(h["val_dice_per_class"]) == 2
        assert h["val_dice"] == pytest.approx(np.mean(h["val_dice_per_class"]))
    # the rule applied by hand: the best mean among the epochs that lose no class by more than tol
    ok = [h for h in g.history if min(np.subtract(h["val_dice_per_class"], ref)) >= -tol]
    assert 0 < len(ok) < len(g.history)  # this run has epochs of both sorts
    expect = max(ok, key=lambda h: h["val_dice"])
    assert expect["val_dice"] > ref.mean() and g.best_epoch == expect["epoch"]
    np.testing.assert_allclose(kept, expect["val_dice_per_class"], atol=1e-9)
    # a learning rate that wrecks the model: every epoch loses a class, the teacher's weights stay
    wreck = fit_unet(images[:4], masks[:4], TrainConfig(**{**cfg.to_dict(), "lr": 5.0}), val_images=images[4:],
                     val_masks=masks[4:], init_state=teacher.state_dict(), selection="guarded")
    assert wreck.best_epoch == -1 and wreck.best_val_dice == pytest.approx(ref.mean())
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in wreck.model.state_dict().items())
    # the mean rule on the same run keeps a trained epoch
    mean = fit_unet(images[:4], masks[:4], TrainConfig(**{**cfg.to_dict(), "lr": 5.0}), val_images=images[4:],
                    val_masks=masks[4:], init_state=teacher.state_dict())
    assert mean.best_epoch >= 0 and mean.reference_val_dice is None


def test_distillation_keeps_a_class_without_labels_near_the_teacher():
    """distill_weight: class 1 gets no labels (weight 0) but the teacher's soft targets; with them the
    student's class-1 output stays closer to the teacher's than without them."""
    images, masks = _data(n=10)
    teacher = fit_unet(images[:6], masks[:6], TrainConfig(epochs=15, batch_size=2, base_channels=4, depth=2,
                                                          lr=2e-2, seed=1, augment=False)).model
    # the student is trained on wrong class-0 labels (shifted), class 1 ignored
    wrong = np.roll(masks, 6, axis=3)
    weight = np.tile(np.array([[1.0, 0.0]], np.float32), (10, 1))
    cfg = TrainConfig(epochs=3, batch_size=2, base_channels=4, depth=2, lr=5e-3, seed=3, augment=False)
    kw = dict(weight=weight, init_state=teacher.state_dict())
    plain = fit_unet(images, wrong, cfg, **kw).model
    distilled = fit_unet(images, wrong, cfg, distill_weight=np.tile(np.array([[0.0, 20.0]], np.float32), (10, 1)),
                         **kw).model
    x = torch.from_numpy(images)[:, None]
    with torch.no_grad():
        t, p, d = (torch.sigmoid(m.eval()(x))[:, 1] for m in (teacher, plain, distilled))
    gap_plain, gap_distilled = float((p - t).abs().mean()), float((d - t).abs().mean())
    assert gap_distilled < 0.5 * gap_plain, (gap_distilled, gap_plain)
    with pytest.raises(ValueError, match="init_state"):
        fit_unet(images, masks, cfg, distill_weight=np.ones((10, 2)))
    with pytest.raises(ValueError, match="distill_weight must have shape"):
        fit_unet(images, masks, cfg, init_state=teacher.state_dict(), distill_weight=np.ones((10, 3)))
