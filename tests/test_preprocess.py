"""The U-Net grid keeps an image's aspect ratio (pad, never stretch) and maps back exactly; gray
levels are normalised as the U-Net was trained (intensity)."""
import cv2
import numpy as np
import pytest

from plabel.method.preprocess import (
    INTENSITIES,
    grid_shape,
    masks_to_grid,
    normalise_intensity,
    probs_to_image,
    to_unet_input,
)


def test_square_images_fill_the_grid_as_a_plain_resize():
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (256, 256), dtype=np.uint8)
    np.testing.assert_array_equal(to_unet_input(gray, 128, "fixed"),
                                  cv2.resize(gray, (128, 128), interpolation=cv2.INTER_AREA).astype(np.float32) / 255)
    probs = rng.random((2, 128, 128), dtype=np.float32)
    np.testing.assert_array_equal(probs_to_image(probs, 256, 256)[1],
                                  cv2.resize(probs[1], (256, 256), interpolation=cv2.INTER_LINEAR))


def test_grid_shape_scales_the_longer_side():
    assert grid_shape(384, 224, 128) == (128, 75)   # 224 * 128 / 384 = 74.67
    assert grid_shape(224, 384, 256) == (149, 256)  # 224 * 256 / 384 = 149.33
    assert grid_shape(100, 100, 64) == (64, 64)
    assert grid_shape(1, 5000, 64) == (1, 64)      # never a zero side


def test_a_wide_image_is_padded_not_stretched():
    """A 60 x 100 image with a 40 x 40 square object: in the 64 grid (38 x 64 valid, rows 38.. padding)
    the object is still square, and the masks come back on the image's grid."""
    gray = np.zeros((60, 100), np.uint8)
    mask = np.zeros((1, 60, 100), bool)
    gray[10:50, 30:70] = 200
    mask[0, 10:50, 30:70] = True
    x = to_unet_input(gray, 64, "fixed")
    g = masks_to_grid(mask, 64)
    assert x.shape == (64, 64) and g.shape == (1, 64, 64)
    assert grid_shape(60, 100, 64) == (38, 64)
    assert not x[38:].any() and not g[0, 38:].any()  # bottom padding: zeros / background
    rows, cols = np.nonzero(g[0])
    assert abs((rows.max() - rows.min()) - (cols.max() - cols.min())) <= 1  # square stays square
    assert abs((rows.max() - rows.min() + 1) - 40 * 0.64) <= 1.5          # scale 64 / 100
    assert abs(np.nonzero(x > 0.5)[0].min() - rows.min()) <= 1  # image and masks aligned (area vs nearest)
    back = probs_to_image(g.astype(np.float32), 60, 100) > 0.5
    inter = (back & mask).sum()
    assert back.shape == (1, 60, 100) and 2 * inter / (back.sum() + mask.sum()) > 0.95  # nearest down, bilinear up


def test_a_tall_image_pads_on_the_right():
    mask = np.zeros((2, 100, 40), bool)
    mask[1, 20:80, 5:35] = True
    g = masks_to_grid(mask, 50)
    assert grid_shape(100, 40, 50) == (50, 20) and not g[:, :, 20:].any()
    back = probs_to_image(g.astype(np.float32), 100, 40) > 0.5
    assert not back[0].any() and 2 * (back[1] & mask[1]).sum() / (back[1].sum() + mask[1].sum()) > 0.95  # halved, then doubled


def test_minmax_stretches_a_washed_out_image_onto_0_255():
    """Levels 240..250 (a washed-out radiograph): 240 -> 0, 250 -> 255, 245 -> 127.5 rounds to 128
    (half to even), 242 -> 51; fixed leaves the image as it is."""
    gray = np.array([[240, 242, 245], [250, 240, 250]], np.uint8)
    got = normalise_intensity(gray, "minmax")
    np.testing.assert_array_equal(got, [[0, 51, 128], [255, 0, 255]])
    assert got.dtype == np.uint8
    assert normalise_intensity(gray, "fixed") is gray
    np.testing.assert_array_equal(normalise_intensity(got, "minmax"), got)  # idempotent


def test_minmax_leaves_a_full_range_or_flat_image_alone():
    full = np.array([[0, 17], [200, 255]], np.uint8)
    np.testing.assert_array_equal(normalise_intensity(full, "minmax"), full)
    # the shortcut for full-range images equals the mapping itself, level by level
    levels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    np.testing.assert_array_equal(normalise_intensity(levels, "minmax"),
                                  np.round(levels.astype(np.float64) / 255 * 255).astype(np.uint8))
    np.testing.assert_array_equal(normalise_intensity(levels, "minmax"), levels)
    flat = np.full((3, 3), 240, np.uint8)  # one level: nothing to stretch, not a division by zero
    np.testing.assert_array_equal(normalise_intensity(flat, "minmax"), flat)


def test_minmax_reaches_the_unet_input_and_fixed_divides_by_255():
    gray = np.array([[100, 110], [120, 110]], np.uint8)
    np.testing.assert_allclose(to_unet_input(gray, 2, "minmax"), [[0, 128 / 255], [1, 128 / 255]], rtol=0, atol=1e-7)
    np.testing.assert_allclose(to_unet_input(gray, 2, "fixed"), gray / 255, rtol=0, atol=1e-7)


def test_an_unknown_intensity_is_refused_by_name():
    assert INTENSITIES == ("fixed", "minmax")
    with pytest.raises(ValueError, match="intensity must be one of .*'percentile'"):
        normalise_intensity(np.zeros((2, 2), np.uint8), "percentile")
