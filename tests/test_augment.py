import numpy as np
import torch

from plabel.method.augment import (affine_matrix, apply_affine, random_affine, random_intensity, sample_affine,
                                   sample_elastic)


def _pair(seed=0, n=3, c=2, h=20, w=24):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand((n, 1, h, w), generator=g)
    masks = torch.zeros((n, c, h, w))
    masks[:, 0, 5:12, 6:15] = 1
    masks[:, 1, 9:16, 10:20] = 1
    return image, masks


def test_identity_is_exact():
    image, masks = _pair()
    g = torch.Generator().manual_seed(1)
    out_i, out_m = random_affine(image, masks, g, 0, 0, 0, 0)
    assert torch.equal(out_i, image) and torch.equal(out_m, masks)
    out = random_intensity(image, g, gamma=(1.0, 1.0), contrast=0.0)
    assert torch.allclose(out, image, atol=1e-6)


def test_translation_moves_blob_by_known_pixels():
    image = torch.zeros(1, 1, 10, 12)
    masks = torch.zeros(1, 1, 10, 12)
    image[0, 0, 2:4, 3:5] = 1.0
    masks[0, 0, 2:4, 3:5] = 1.0
    out_i, out_m = apply_affine(image, masks, affine_matrix(translate_px=(3, 2)))
    expected = torch.zeros(10, 12)
    expected[4:6, 6:8] = 1.0
    assert torch.equal(out_m[0, 0], expected)
    assert torch.allclose(out_i[0, 0], expected, atol=1e-5)


def test_rotation_90_moves_pixel_where_expected():
    # centred coords of (row 1, col 6) in 8x8: (x, y) = (2.5, -2.5); +90 deg -> (2.5, 2.5)
    masks = torch.zeros(1, 1, 8, 8)
    masks[0, 0, 1, 6] = 1
    _, out = apply_affine(torch.zeros(1, 1, 8, 8), masks, affine_matrix(rotate_deg=90))
    expected = torch.zeros(8, 8)
    expected[6, 6] = 1
    assert torch.equal(out[0, 0], expected)


def test_image_and_masks_move_together():
    _, masks = _pair()
    image = masks[:, :1].clone()          # the image is a copy of mask 0
    g = torch.Generator().manual_seed(3)
    out_i, out_m = random_affine(image, masks, g, max_rotate_deg=30, max_translate=0.2)
    assert not torch.equal(out_m, masks)  # something moved
    assert torch.equal((out_i >= 0.5).float(), out_m[:, :1])
    assert set(out_m.unique().tolist()) <= {0.0, 1.0}


def test_deterministic_given_seed():
    image, masks = _pair()
    a = random_affine(image, masks, torch.Generator().manual_seed(7))
    b = random_affine(image, masks, torch.Generator().manual_seed(7))
    c = random_affine(image, masks, torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    ia = random_intensity(image, torch.Generator().manual_seed(7))
    ib = random_intensity(image, torch.Generator().manual_seed(7))
    assert torch.equal(ia, ib)
    assert ia.min() >= 0 and ia.max() <= 1 and ia.shape == image.shape


def test_samples_get_different_transforms():
    image, masks = _pair(n=2)
    _, out = random_affine(image, masks, torch.Generator().manual_seed(0), max_translate=0.2)
    assert not torch.equal(out[0], out[1])
    np.testing.assert_array_equal(out.shape, masks.shape)


def _constant_field(n, h, w, dx, dy):
    d = torch.zeros(n, h, w, 2)
    d[..., 0], d[..., 1] = dx, dy
    return d


def test_elastic_displacement_shows_the_pixel_it_points_to():
    # output pixel p shows the input at p + d: a constant d = (+3, +2) moves a blob by (-3, -2)
    image = torch.zeros(1, 1, 10, 12)
    masks = torch.zeros(1, 1, 10, 12)
    image[0, 0, 4:6, 6:8] = 1.0
    masks[0, 0, 4:6, 6:8] = 1.0
    out_i, out_m = apply_affine(image, masks, affine_matrix(), _constant_field(1, 10, 12, 3, 2))
    expected = torch.zeros(10, 12)
    expected[2:4, 3:5] = 1.0
    assert torch.equal(out_m[0, 0], expected)
    assert torch.allclose(out_i[0, 0], expected, atol=1e-5)


def test_elastic_composes_with_the_affine_in_one_grid():
    # the displacement acts before the affine: d = (3, 2) then a translation by (3, 2) is the identity
    image, masks = _pair(n=1)
    out_i, out_m = apply_affine(image, masks, affine_matrix(translate_px=(3, 2)), _constant_field(1, 20, 24, 3, 2))
    assert torch.allclose(out_i, image, atol=1e-5) and torch.equal(out_m, masks)
    # with a 90-degree rotation: output p shows the input at R^-1 (p + d); centred coords of
    # (row 1, col 5) in 8x8 are (1.5, -2.5); d = (1, 0) -> (2.5, -2.5) -> R^-1 -> (-2.5, -2.5): row 1, col 1
    masks = torch.zeros(1, 1, 8, 8)
    masks[0, 0, 1, 1] = 1
    _, out = apply_affine(torch.zeros(1, 1, 8, 8), masks, affine_matrix(rotate_deg=90),
                          _constant_field(1, 8, 8, 1, 0))
    expected = torch.zeros(8, 8)
    expected[1, 5] = 1
    assert torch.equal(out[0, 0], expected)


def test_sample_elastic_bound_control_points_and_smoothness():
    g = torch.Generator().manual_seed(4)
    field = sample_elastic(3, 64, 80, g, 0.05)
    assert field.shape == (3, 64, 80, 2) and field.dtype == torch.float32
    assert field[..., 0].abs().max() <= 0.05 * 80 + 1e-5 and field[..., 1].abs().max() <= 0.05 * 64 + 1e-5
    assert field.abs().max() > 0.5                       # it does move pixels
    # smooth: neighbouring pixels move by far less than the bound
    assert (field[:, 1:] - field[:, :-1]).abs().max() < 0.05 * 64 / 4
    # on a grid of exactly the control points the field is the draw itself (uniform in +-bound)
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    coarse = sample_elastic(2, 5, 5, g1, 0.1, control_points=5)
    u = torch.rand((2, 2, 5, 5), generator=g2, dtype=torch.float64) * 2 - 1
    assert torch.allclose(coarse.permute(0, 3, 1, 2).double(), u * 0.5, atol=1e-6)


def test_random_affine_with_elastic_moves_image_and_masks_together():
    _, masks = _pair()
    image = masks[:, :1].clone()
    out_i, out_m = random_affine(image, masks, torch.Generator().manual_seed(3), 0, 0, 0, 0, elastic=0.08)
    assert not torch.equal(out_m, masks)
    assert torch.equal((out_i >= 0.5).float(), out_m[:, :1])
    assert set(out_m.unique().tolist()) <= {0.0, 1.0}
    again = random_affine(image, masks, torch.Generator().manual_seed(3), 0, 0, 0, 0, elastic=0.08)
    assert torch.equal(again[0], out_i) and torch.equal(again[1], out_m)


def test_without_elastic_the_affine_draws_are_unchanged():
    # elastic 0 draws exactly the affine of sample_affine: older training runs reproduce bit for bit
    image, masks = _pair()
    a = random_affine(image, masks, torch.Generator().manual_seed(5), elastic=0.0)
    fwd = sample_affine(3, 20, 24, torch.Generator().manual_seed(5))
    b = apply_affine(image, masks, fwd)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
