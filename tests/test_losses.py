import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from plabel.method.losses import (
    bce_per_entry,
    distillation_loss,
    distillation_weight,
    positive_class_weights,
    segmentation_loss,
    soft_dice_per_entry,
)


def _case(seed=0, n=2, c=3, h=5, w=6):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn((n, c, h, w), generator=g)
    target = (torch.rand((n, c, h, w), generator=g) > 0.6).float()
    return logits, target


def test_bce_matches_torch_with_pos_weight():
    logits, target = _case()
    pw = torch.tensor([1.0, 2.5, 7.0])
    ours = bce_per_entry(logits, target, pw).mean()
    ref = F.binary_cross_entropy_with_logits(logits, target, pos_weight=pw.view(3, 1, 1))
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
    # whole loss = BCE part + Dice part
    total = segmentation_loss(logits, target, pos_weight=pw)
    dice_part = soft_dice_per_entry(logits, target).mean()
    assert total.item() == pytest.approx(ref.item() + dice_part.item(), rel=1e-6)


def test_bce_hand_value():
    # logit 0, positive pixel, pos_weight 2 -> 2 * ln 2
    v = bce_per_entry(torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1), torch.tensor([2.0]))
    assert v.item() == pytest.approx(2 * math.log(2))


def test_soft_dice_hand_value():
    # p = 0.5 on 4 pixels, one positive: inter 0.5, sum p 2, sum t 1
    logits = torch.zeros(1, 1, 2, 2)
    target = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    assert soft_dice_per_entry(logits, target, smooth=0.0).item() == pytest.approx(1 - 1 / 3)
    assert soft_dice_per_entry(logits, target, smooth=1.0).item() == pytest.approx(0.5)


def test_zero_weight_removes_class_of_sample():
    logits, target = _case()
    cw = torch.ones(2, 3)
    cw[0, 1] = 0.0
    base = segmentation_loss(logits, target, cw).item()
    changed = logits.clone()
    changed[0, 1] = 100.0 * torch.randn(5, 6)
    assert segmentation_loss(changed, target, cw).item() == pytest.approx(base, rel=1e-6)

    x = logits.clone().requires_grad_(True)
    segmentation_loss(x, target, cw).backward()
    assert torch.all(x.grad[0, 1] == 0)
    assert x.grad[1, 1].abs().sum() > 0 and x.grad[0, 0].abs().sum() > 0


def test_weighted_mean_matches_subset():
    # With weights in {0, 1}, the loss equals the loss over the kept entries alone.
    logits, target = _case()
    cw = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    assert segmentation_loss(logits, target, cw).item() == pytest.approx(
        segmentation_loss(logits[:1], target[:1]).item(), rel=1e-6)


def test_all_zero_weights_give_zero_with_grad():
    logits, target = _case()
    x = logits.clone().requires_grad_(True)
    loss = segmentation_loss(x, target, torch.zeros(2, 3))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.all(x.grad == 0)


def test_shape_errors_name_shapes():
    logits, target = _case()
    with pytest.raises(ValueError, match=r"\(2, 3, 5, 6\).*\(1, 3, 5, 6\)"):
        segmentation_loss(logits, target[:1])
    with pytest.raises(ValueError, match=r"\(3, 2\)"):
        segmentation_loss(logits, target, torch.ones(3, 2))


def test_positive_class_weights():
    w = positive_class_weights([0.2, 0.0, 1.0, 0.5], max_weight=50.0)
    assert w.dtype == torch.float32
    np.testing.assert_allclose(w.numpy(), [4.0, 50.0, 0.02, 1.0], rtol=1e-6)
    with pytest.raises(ValueError):
        positive_class_weights([1.5])


def test_distillation_loss_hand_values():
    # one pixel per entry; logit 0 (p = 0.5) against teacher 0.2: BCE = log 2; logit(0.9) against 0.9: H(0.9)
    logits = torch.tensor([[[[0.0]], [[math.log(9.0)]]]], requires_grad=True)
    soft = torch.tensor([[[[0.2]], [[0.9]]]])
    h09 = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))
    both = distillation_loss(logits, soft, torch.tensor([[1.0, 1.0]])).item()
    assert both == pytest.approx((math.log(2) + h09) / 2)
    # a weight is the strength of its entry; weight-0 entries are not counted
    loss = distillation_loss(logits, soft, torch.tensor([[2.0, 0.0]]))
    assert loss.item() == pytest.approx(2 * math.log(2))
    loss.backward()  # d/dlogit = w * (sigmoid(logit) - target) / count
    assert logits.grad[0, :, 0, 0].tolist() == pytest.approx([2 * (0.5 - 0.2), 0.0])
    zero = distillation_loss(logits, soft, torch.zeros(1, 2))
    assert zero.item() == 0.0 and zero.requires_grad
    with pytest.raises(ValueError, match="weight"):
        distillation_loss(logits, soft, torch.ones(2, 2))
    with pytest.raises(ValueError, match=">= 0"):
        distillation_loss(logits, soft, torch.tensor([[1.0, -1.0]]))


def test_distillation_weight_marks_the_unlabelled_entries():
    w = np.array([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]], np.float32)
    out = distillation_weight(w, 0.5)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, [[0.0, 0.5, 0.0], [0.5, 0.5, 0.0]])
    t = distillation_weight(torch.from_numpy(w), 2.0)
    assert t.dtype == torch.float32 and t.tolist() == [[0.0, 2.0, 0.0], [2.0, 2.0, 0.0]]
    assert not distillation_weight(w, 0.0).any()
