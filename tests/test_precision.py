"""Training precision and layout (plabel.training.precision; TrainConfig.precision / channels_last)."""
import numpy as np
import pytest
import torch

from plabel.training import precision
from plabel.training.inprocess import fit_unet
from plabel.training.loop import TrainConfig, build_model, make_optimizer, train_step


def test_auto_is_bf16_only_where_the_hardware_has_it(monkeypatch):
    assert precision.resolve_precision("fp32", "cpu") == "fp32"
    assert precision.resolve_precision("bf16", "cpu") == "bf16"
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    assert precision.resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    assert precision.resolve_precision("auto", "cpu") == "fp32"
    with pytest.raises(ValueError, match="precision 'fp16'"):
        precision.resolve_precision("fp16", "cpu")


def test_cpu_flags_are_read_from_proc_cpuinfo():
    flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    assert precision.cpu_has_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags)


def _step_loss(**variant) -> tuple[float, dict]:
    cfg = TrainConfig(base_channels=4, depth=2, batch_size=2, augment=False, **variant)
    model, _ = build_model(cfg, 3)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt, _ = make_optimizer(model, cfg)
    g = torch.Generator().manual_seed(0)
    x = torch.linspace(0, 1, 2 * 32 * 32).reshape(2, 1, 32, 32)
    m = (x.repeat(1, 3, 1, 1) > torch.tensor([0.2, 0.5, 0.8])[None, :, None, None]).float()
    loss = train_step(model, opt, x, m, None, None, cfg, g)
    return loss, {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_channels_last_is_the_same_maths_and_bf16_is_close():
    """One training step from the same weights: channels_last gives fp32's loss and updated weights
    (to float rounding); bf16 autocast gives a loss within 2 % (its forward pass rounds to 8 bits)
    and fp32 weights."""
    base, w_base = _step_loss()
    cl, w_cl = _step_loss(channels_last=True)
    bf, w_bf = _step_loss(precision="bf16")
    assert cl == pytest.approx(base, rel=1e-5)
    assert all(torch.allclose(w_cl[k].float(), w_base[k].float(), atol=1e-5) for k in w_base)
    assert bf == pytest.approx(base, rel=0.02) and bf != base
    assert all(v.dtype == w_base[k].dtype for k, v in w_bf.items())  # the weights stay fp32


def test_a_channels_last_bf16_run_saves_a_plain_model():
    """fit_unet with bf16 + channels_last: the kept model predicts in fp32 like any other and its
    weights load into a fresh U-Net."""
    rng = np.random.default_rng(0)
    x = rng.random((4, 32, 32), dtype=np.float32)
    y = (x[:, None] > np.array([0.3, 0.6])[None, :, None, None]).astype(np.uint8)
    res = fit_unet(x, y, TrainConfig(epochs=2, base_channels=4, depth=2, batch_size=2, precision="bf16",
                                     channels_last=True), val_images=x, val_masks=y)
    fresh, _ = build_model(TrainConfig(base_channels=4, depth=2), 2)
    fresh.load_state_dict(res.model.state_dict())
    res.model.eval(), fresh.eval()
    with torch.no_grad():
        a = torch.sigmoid(res.model(torch.as_tensor(x[:, None])))
        b = torch.sigmoid(fresh(torch.as_tensor(x[:, None])))
    assert a.dtype == torch.float32 and torch.allclose(a, b, atol=1e-5)
    assert len(res.history) == 2 and res.best_val_dice is not None
