import copy
import time

import numpy as np
import pytest
import torch

from plabel.method.losses import positive_class_weights
from plabel.method.unet import load_checkpoint, save_checkpoint
from plabel.schemas.config import StudentSection, TrainSection
from plabel.training.loop import (
    POS_WEIGHT_BATCHES,
    TrainConfig,
    array_batches,
    build_model,
    evaluate_batch,
    fit,
    make_optimizer,
    positive_fraction,
    shuffle_seed,
    train_step,
)
from plabel.training.soup import average_checkpoints, average_weights


def _two_square_image(h=32):
    a = torch.zeros(h, h)
    b = torch.zeros(h, h)
    a[4:20, 4:20] = 1
    b[12:28, 10:26] = 1                       # overlaps a
    g = torch.Generator().manual_seed(0)
    image = 0.1 + 0.3 * a + 0.5 * b + 0.02 * torch.randn((h, h), generator=g)
    return image.clamp(0, 1)[None, None], torch.stack([a, b])[None]


def test_config_round_trip():
    cfg = TrainConfig(epochs=3, lr=2e-3, augment=False)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="lrr"):
        TrainConfig.from_dict({"lrr": 1})


def test_cosine_schedule_per_epoch():
    cfg = TrainConfig(epochs=4, lr=1e-2, base_channels=4, depth=1)
    model, _ = build_model(cfg, 2)
    opt, sched = make_optimizer(model, cfg)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-2)
    assert lrs[2] == pytest.approx(5e-3)      # half way through the cosine
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


@pytest.fixture
def one_thread():
    # A tiny net gains nothing from intra-op threads, and spinning threads on a busy
    # 2-core machine slow it down many times.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_overfits_two_overlapping_squares(one_thread):
    torch.manual_seed(0)
    image, masks = _two_square_image()
    cfg = TrainConfig(base_channels=4, depth=2, lr=1e-2, weight_decay=0.0, augment=False)
    model, _ = build_model(cfg, num_classes=2)
    opt, _ = make_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(0)
    start = time.process_time()             # CPU time: robust to a busy machine
    for _ in range(250):
        loss = train_step(model, opt, image, masks, None, None, cfg, gen)
    assert time.process_time() - start < 20
    d = evaluate_batch(model, image, masks)
    assert d.shape == (1, 2) and d.dtype == np.float64
    assert d.min() > 0.9, d
    assert loss < 0.3


def test_augmented_steps_are_seeded_and_weight_zero_blocks_class(one_thread):
    image, masks = _two_square_image()
    image, masks = image.repeat(2, 1, 1, 1), masks.repeat(2, 1, 1, 1)
    cfg = TrainConfig(base_channels=4, depth=2, augment=True, seed=5)
    losses = []
    for _ in range(2):
        model, _ = build_model(cfg, 2)
        opt, _ = make_optimizer(model, cfg)
        gen = torch.Generator().manual_seed(cfg.seed)
        losses.append([train_step(model, opt, image, masks, None, None, cfg, gen)
                       for _ in range(3)])
    assert losses[0] == losses[1]

    model, _ = build_model(cfg, 2)
    opt, _ = make_optimizer(model, cfg)
    cw = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    train_step(model, opt, image, masks, cw, torch.tensor([2.0, 3.0]), cfg,
               torch.Generator().manual_seed(0))
    head = model.head
    assert torch.all(head.weight.grad[1] == 0) and torch.all(head.bias.grad[1] == 0)
    assert head.weight.grad[0].abs().sum() > 0


def test_average_weights_hand_values():
    a = {"w": torch.tensor([1.0, 2.0, 4.0]), "n": torch.tensor(3, dtype=torch.long),
         "h": torch.tensor([1.0], dtype=torch.float16)}
    b = {"w": torch.tensor([3.0, 2.0, -4.0]), "n": torch.tensor(4, dtype=torch.long),
         "h": torch.tensor([2.0], dtype=torch.float16)}
    out = average_weights([a, b])
    assert out["w"].tolist() == [2.0, 2.0, 0.0]
    assert out["n"].dtype == torch.long and int(out["n"]) == 3  # floor of 3.5
    assert out["h"].dtype == torch.float16 and out["h"].tolist() == [1.5]
    assert average_weights([a])["w"].tolist() == [1.0, 2.0, 4.0]
    with pytest.raises(ValueError, match="state dict 1 has other keys"):
        average_weights([a, {"w": b["w"], "n": b["n"]}])
    with pytest.raises(ValueError, match=r"w has shape \(2,\) in state dict 1"):
        average_weights([a, {**b, "w": torch.zeros(2)}])
    with pytest.raises(ValueError, match="no state dicts"):
        average_weights([])


def test_average_checkpoints_is_the_mean_model(tmp_path, one_thread):
    paths = []
    for seed in (1, 2):
        model, ucfg = build_model(TrainConfig(base_channels=4, depth=2, seed=seed), 2)
        paths.append(tmp_path / f"s{seed}.pt")
        save_checkpoint(paths[-1], model, ucfg, {"role": "student", "epoch": seed})
    meta = average_checkpoints(paths, tmp_path / "soup.pt", {"soup": ["a", "b"]})
    assert meta == {"role": "student", "epoch": 1, "soup": ["a", "b"], "averaged_from": 2}
    soup, scfg, smeta = load_checkpoint(tmp_path / "soup.pt")
    m1, m2 = load_checkpoint(paths[0])[0], load_checkpoint(paths[1])[0]
    assert scfg == load_checkpoint(paths[0])[1] and smeta == meta
    for k, v in soup.state_dict().items():
        want = (m1.state_dict()[k].double() + m2.state_dict()[k].double()) / 2
        torch.testing.assert_close(v.double(), want.floor() if not v.is_floating_point() else want,
                                   rtol=1e-6, atol=1e-7)
    assert not torch.equal(soup.head.weight, m1.head.weight)

    other, ocfg = build_model(TrainConfig(base_channels=8, depth=2, seed=3), 2)
    save_checkpoint(tmp_path / "other.pt", other, ocfg)
    with pytest.raises(ValueError, match="other.pt is a U-Net .* only checkpoints of one architecture"):
        average_checkpoints([paths[0], tmp_path / "other.pt"], tmp_path / "bad.pt")
    assert not (tmp_path / "bad.pt").exists()


# ----------------------------------------------------------------------------- the loop (plabel.training.loop.fit)


def test_positive_fraction_counts_weighted_pixels_of_the_first_batches():
    masks = np.zeros((2, 2, 4, 4), np.uint8)
    masks[0, 0] = 1  # all positive, but weight 0 below
    masks[1, 0, :2] = 1
    w = np.array([[0, 1], [1, 1]], np.float32)
    batches = [{"masks": masks[:1], "weight": w[:1]}, {"masks": torch.from_numpy(masks[1:]), "weight": w[1:]}]
    p = positive_fraction(batches)
    assert p.dtype == np.float64 and p.tolist() == pytest.approx([0.5, 1e-4])  # 8 of 16 pixels; none (clipped)
    full = {"masks": np.ones((1, 2, 4, 4), np.uint8), "weight": np.ones((1, 2), np.float32)}
    assert positive_fraction(batches + [full]).tolist() == pytest.approx([24 / 32, 16 / 48])
    assert positive_fraction(batches + [full], max_batches=2).tolist() == p.tolist()  # the third is not read
    with pytest.raises(ValueError, match="no training batches"):
        positive_fraction([])


def test_array_batches_is_a_seeded_permutation_per_epoch():
    src = array_batches({"i": torch.arange(10), "j": torch.arange(10) * 2}, 4, seed=3)
    e0 = [b["i"].tolist() for b in src(0)]
    assert [len(b) for b in e0] == [4, 4, 2] and [b["i"].tolist() for b in src(0)] == e0  # the same each call
    want = torch.randperm(10, generator=torch.Generator().manual_seed(shuffle_seed(3, 0))).tolist()
    assert sum(e0, []) == want and sorted(want) == list(range(10)) and want != list(range(10))
    assert sum((b["i"].tolist() for b in src(1)), []) != want  # another epoch, another order
    assert all(torch.equal(b["j"], 2 * b["i"]) for b in src(2))  # rows stay together
    assert [b["i"].tolist() for b in array_batches({"i": torch.arange(5)}, 2, shuffle=False)(7)] == [[0, 1], [2, 3], [4]]
    assert shuffle_seed(3, 2, rank=1) == (3 * 1009 + 1) * 1009 + 2


def _squares(n=6, size=16, seed=0):
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, 2, size, size), np.float32)
    for i in range(n):
        y, x = rng.integers(1, size // 2, 2)
        masks[i, 0, y:y + 6, x:x + 6] = 1
        masks[i, 1, y + 3:y + 8, x + 2:x + 7] = 1
    images = (0.1 + 0.3 * masks[:, 0] + 0.4 * masks[:, 1] + 0.02 * rng.standard_normal((n, size, size))).clip(0, 1)
    return torch.from_numpy(images.astype(np.float32)), torch.from_numpy(masks)


def test_fit_measures_positive_class_weights_on_the_first_32_batches_of_epoch_0():
    """32 batches of empty masks, then 2 all positive: only the first 32 count (p clipped to 1e-4: the
    largest weight, 50); with the positive ones first, they count."""

    assert POS_WEIGHT_BATCHES == 32
    masks = torch.zeros(34, 1, 8, 8)
    masks[32:] = 1
    rows = {"image": torch.zeros(34, 8, 8), "masks": masks, "weight": torch.ones(34, 1)}
    cfg = TrainConfig(epochs=0, batch_size=1, base_channels=4, depth=1)
    late = fit(cfg, 1, array_batches(rows, 1, shuffle=False))
    assert late.pos_weight.tolist() == [50.0] and late.history == [] and late.epoch == -1
    early = fit(cfg, 1, lambda epoch: reversed(list(array_batches(rows, 1, shuffle=False)(epoch))))
    assert early.pos_weight.tolist() == pytest.approx(positive_class_weights(np.array([2 / 32])).tolist())
    assert early.pos_weight.tolist() == pytest.approx([15.0])


def test_fit_resumed_from_its_checkpoint_continues_the_uninterrupted_run(one_thread):
    """fit(resume=state.checkpoint()) after epoch 0 runs epochs 1.. exactly as the uninterrupted run
    did (augmentation on: the generator's state travels in the checkpoint): the same losses, weights,
    kept epoch and selector."""

    x, y = _squares()
    rows = {"image": x[:4], "masks": y[:4], "weight": torch.ones(4, 2)}
    cfg = TrainConfig(epochs=3, batch_size=2, base_channels=4, depth=1, lr=5e-3, seed=2)
    src = array_batches(rows, 2, seed=2)

    def val():
        return array_batches({"image": x[4:], "masks": y[4:]}, 8, shuffle=False)(0)

    saved = []
    full = fit(cfg, 2, src, val, on_epoch_end=lambda s: saved.append(copy.deepcopy(s.checkpoint())))
    assert [h["epoch"] for h in full.history] == [0, 1, 2] and [c["epoch"] for c in saved] == [0, 1, 2]
    assert all(len(h["val_dice_per_class"]) == 2 and 0 <= h["val_dice"] <= 1 for h in full.history)
    assert full.best_epoch == int(np.argmax([h["val_dice"] for h in full.history]))
    resumed = fit(cfg, 2, src, val, resume=saved[0])
    assert resumed.start_epoch == 1 and [h["epoch"] for h in resumed.history] == [1, 2]
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history[1:]]
    assert [h["val_dice"] for h in resumed.history] == [h["val_dice"] for h in full.history[1:]]
    for k, v in full.base.state_dict().items():
        assert torch.equal(v, resumed.base.state_dict()[k]), k
    for k, v in full.best_state.items():
        assert torch.equal(v, resumed.best_state[k]), k
    assert resumed.best_epoch == full.best_epoch and resumed.selector == full.selector
    assert resumed.best_val_dice == pytest.approx(full.history[full.best_epoch]["val_dice"])


def test_fit_distils_the_weight_zero_classes_unless_the_batch_says_otherwise(one_thread):
    """teacher + distill: the soft targets train distill * (weight == 0), the same as a batch's own
    distill_weight of those values; other distill weights train otherwise."""
    x, y = _squares(n=4)
    w = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    cfg = TrainConfig(epochs=1, batch_size=2, base_channels=4, depth=1, lr=1e-2, seed=1, augment=False)
    teacher, _ = build_model(TrainConfig(base_channels=4, depth=1, seed=9), 2)

    def run(distill, dw=None):
        rows = {"image": x, "masks": y, "weight": w, **({} if dw is None else {"distill_weight": dw})}
        return fit(cfg, 2, array_batches(rows, 2, seed=1), teacher=teacher, distill=distill)

    by_rule, by_batch, none = run(3.0), run(0.0, 3.0 * (w == 0).float()), run(0.0)
    assert by_rule.history[0]["loss"] == by_batch.history[0]["loss"] != none.history[0]["loss"]
    for k, v in by_rule.base.state_dict().items():
        assert torch.equal(v, by_batch.base.state_dict()[k]), k
    assert not torch.equal(by_rule.base.head.weight, none.base.head.weight)


def test_config_from_a_run_config_section():
    section = StudentSection(epochs=7, lr=5e-4, weight_decay=0.0, batch_size=2, base_channels=8, depth=3,
                             augment=False, elastic=0.04, seed=4, image_size=64, intensity="fixed")
    cfg = TrainConfig.from_section(section)
    assert (cfg.epochs, cfg.lr, cfg.weight_decay, cfg.batch_size, cfg.base_channels, cfg.depth, cfg.augment,
            cfg.elastic, cfg.seed, cfg.intensity) == (7, 5e-4, 0.0, 2, 8, 3, False, 0.04, 4, "fixed")
    assert cfg.norm == TrainConfig().norm and cfg.pos_weight_max == TrainConfig().pos_weight_max
    assert TrainConfig.from_section(TrainSection(), epochs=3, seed=9) == TrainConfig(
        epochs=3, lr=TrainSection().lr, seed=9, intensity="minmax")  # the run config's default
    assert TrainConfig.from_section(TrainSection(), epochs=3).unet_config(2).intensity == "minmax"
    with pytest.raises(ValueError, match="epoch"):
        TrainConfig.from_section(TrainSection(), epoch=3)
