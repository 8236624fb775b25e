"""The mean-teacher baseline (plabel.training.ema; fit(ema=...)): the EMA arithmetic by hand, the
teacher's place in the loop at the two ends of the decay, and resume."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from plabel.training.ema import ema_update, mean_teacher
from plabel.training.loop import TrainConfig, array_batches, build_model, fit


def _squares(n=6, h=16):
    g = torch.Generator().manual_seed(3)
    y = torch.zeros(n, 2, h, h)
    for i in range(n):
        r, c = (int(v) for v in torch.randint(1, h // 2, (2,), generator=g))
        y[i, 0, r:r + 6, c:c + 6] = 1
        y[i, 1, r + 3:r + 8, c + 2:c + 7] = 1
    x = (0.1 + 0.3 * y[:, 0] + 0.4 * y[:, 1] + 0.02 * torch.randn(n, h, h, generator=g)).clamp(0, 1)
    return x, y


def test_ema_update_by_hand():
    student, teacher = nn.BatchNorm1d(2), nn.BatchNorm1d(2)
    with torch.no_grad():
        teacher.weight.copy_(torch.tensor([1.0, 2.0]))
        teacher.bias.copy_(torch.tensor([0.0, 4.0]))
        student.weight.copy_(torch.tensor([3.0, 0.0]))
        student.bias.copy_(torch.tensor([10.0, 4.0]))
        student.running_mean.copy_(torch.tensor([5.0, 6.0]))
    ema_update(teacher, student, 0.75)
    assert teacher.weight.tolist() == [1.5, 1.5]        # 0.75 * 1 + 0.25 * 3, 0.75 * 2 + 0.25 * 0
    assert teacher.bias.tolist() == [2.5, 4.0]          # 0.75 * 0 + 0.25 * 10
    assert teacher.running_mean.tolist() == [5.0, 6.0]  # buffers: the student's
    assert student.weight.tolist() == [3.0, 0.0]        # the student is untouched
    ema_update(teacher, student, 0.0)
    assert teacher.weight.tolist() == [3.0, 0.0]
    with pytest.raises(ValueError, match="decay"):
        ema_update(teacher, student, 1.5)
    with pytest.raises(ValueError, match="different parameters"):
        ema_update(nn.Sequential(nn.Linear(2, 2)), student, 0.5)


def test_mean_teacher_is_a_frozen_copy():
    model, _ = build_model(TrainConfig(base_channels=4, depth=1, seed=0), 2)
    t = mean_teacher(model)
    assert not t.training and not any(p.requires_grad for p in t.parameters())
    assert all(torch.equal(a, b) for a, b in zip(t.state_dict().values(), model.state_dict().values()))
    with torch.no_grad():
        next(t.parameters()).add_(1.0)
    assert not torch.equal(next(t.parameters()), next(model.parameters()))


def _run(ema, epochs=2, **kw):
    x, y = _squares()
    w = torch.ones(6, 2)
    w[3:] = 0  # three unlabelled images: the consistency loss's entries
    cfg = TrainConfig(epochs=epochs, batch_size=2, base_channels=4, depth=1, lr=1e-2, seed=5)
    return fit(cfg, 2, array_batches({"image": x, "masks": y, "weight": w}, 2, seed=5), ema=ema, distill=1.0, **kw)


def test_fit_with_ema_ends_at_the_decays_bounds():
    """decay 0: after every step the mean teacher is the student, so it ends equal to the final
    weights; decay 1: it never moves from the starting weights (cfg.seed's fresh U-Net). In between
    it is neither, and it changed the training (a run without it differs)."""
    start, _ = build_model(TrainConfig(epochs=2, batch_size=2, base_channels=4, depth=1, lr=1e-2, seed=5), 2)
    follow, still, mid = _run(0.0), _run(1.0), _run(0.9)
    for k, v in follow.base.state_dict().items():
        assert torch.equal(follow.ema_teacher.state_dict()[k], v), k
    for name, p in still.ema_teacher.named_parameters():
        assert torch.equal(p, dict(start.named_parameters())[name]), name
    t, s = mid.ema_teacher.head.weight, mid.base.head.weight
    assert not torch.equal(t, s) and not torch.equal(t, start.head.weight)
    plain = fit(TrainConfig(epochs=2, batch_size=2, base_channels=4, depth=1, lr=1e-2, seed=5), 2,
                array_batches({"image": _squares()[0], "masks": _squares()[1],
                               "weight": torch.cat([torch.ones(3, 2), torch.zeros(3, 2)])}, 2, seed=5))
    assert plain.history[0]["loss"] != mid.history[0]["loss"]
    with pytest.raises(ValueError, match="not both"):
        _run(0.9, teacher=copy.deepcopy(start))


def test_fit_with_ema_resumes_with_its_mean_teacher():
    saved = []
    full = _run(0.9, epochs=3, on_epoch_end=lambda s: saved.append(copy.deepcopy(s.checkpoint())))
    assert "ema_teacher" in saved[0]
    resumed = _run(0.9, epochs=3, resume=saved[0])
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history[1:]]
    for k, v in full.ema_teacher.state_dict().items():
        assert torch.equal(v, resumed.ema_teacher.state_dict()[k]), k
