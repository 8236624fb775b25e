import time

import numpy as np
import pytest
import torch

from plabel.training.loop import (TrainConfig, average_checkpoints, average_weights, build_model, evaluate_batch,
                               make_optimizer, train_step)


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
    from plabel.method.unet import load_checkpoint, save_checkpoint

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


def test_config_from_a_run_config_section():
    from plabel.schemas.config import StudentSection, TrainSection

    section = StudentSection(epochs=7, lr=5e-4, weight_decay=0.0, batch_size=2, base_channels=8, depth=3,
                             augment=False, seed=4, image_size=64)
    cfg = TrainConfig.from_section(section)
    assert (cfg.epochs, cfg.lr, cfg.weight_decay, cfg.batch_size, cfg.base_channels, cfg.depth, cfg.augment,
            cfg.seed) == (7, 5e-4, 0.0, 2, 8, 3, False, 4)
    assert cfg.norm == TrainConfig().norm and cfg.pos_weight_max == TrainConfig().pos_weight_max
    assert TrainConfig.from_section(TrainSection(), epochs=3, seed=9) == TrainConfig(
        epochs=3, lr=TrainSection().lr, seed=9)
    with pytest.raises(ValueError, match="epoch"):
        TrainConfig.from_section(TrainSection(), epoch=3)
