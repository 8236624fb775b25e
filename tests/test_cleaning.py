import numpy as np
import pytest

from plabel.method.cleaning import CleaningConfig, best_component, clean_class_mask, clean_masks, fill_holes


def test_keeps_component_with_highest_mean_probability_not_the_largest():
    prob = np.zeros((10, 12), np.float32)
    prob[1:7, 1:7] = 0.6  # large, 36 px, mean 0.6
    prob[2:4, 9:11] = 0.95  # small, 4 px, mean 0.95
    mask = best_component(prob, 0.5)
    expected = np.zeros_like(mask)
    expected[2:4, 9:11] = True
    np.testing.assert_array_equal(mask, expected)


def test_diagonal_pixels_are_one_component():
    prob = np.zeros((5, 5), np.float32)
    prob[0, 0] = prob[1, 1] = prob[2, 2] = 0.9
    prob[4, 0] = 0.99  # separate single pixel with higher mean
    assert best_component(prob, 0.5).sum() == 1 and best_component(prob, 0.5)[4, 0]
    prob[4, 0] = 0.8
    np.testing.assert_array_equal(np.argwhere(best_component(prob, 0.5)), [[0, 0], [1, 1], [2, 2]])


def test_threshold_is_strict_and_empty_input_gives_empty_mask():
    prob = np.full((4, 4), 0.5, np.float32)
    assert not best_component(prob, 0.5).any()
    assert not clean_class_mask(prob).any()


def test_fill_holes_fills_enclosed_background_only():
    m = np.zeros((7, 7), bool)
    m[1:6, 1:6] = True
    m[3, 3] = False  # enclosed hole
    m[1, 3] = False  # notch open to outside via... still enclosed? no: row 0 is background
    m[0:2, 3] = False
    filled = fill_holes(m)
    assert filled[3, 3]
    assert not filled[1, 3] and not filled[0, 3]
    assert filled.sum() == m.sum() + 1


def test_opening_removes_thin_spur_and_keeps_body():
    prob = np.zeros((20, 20), np.float32)
    prob[5:15, 5:15] = 0.9
    prob[10, 15:19] = 0.9  # 1-px spur attached to the square
    raw = clean_class_mask(prob, CleaningConfig())
    assert raw.sum() == 100 + 4
    opened = clean_class_mask(prob, CleaningConfig(opening_radius=1))
    assert not opened[10, 16:19].any()
    assert opened[7:13, 7:13].all()


def test_morphology_never_empties_a_mask():
    prob = np.zeros((9, 9), np.float32)
    prob[4, 4] = 0.9  # a single pixel: opening would delete it
    out = clean_class_mask(prob, CleaningConfig(opening_radius=2))
    assert out.sum() == 1 and out[4, 4]


def test_clean_masks_is_per_class_and_overlap_is_kept():
    probs = np.zeros((2, 8, 8), np.float32)
    probs[0, 0:6, 0:6] = 0.9
    probs[1, 3:8, 3:8] = 0.8
    probs[1, 0, 7] = 0.99
    masks = clean_masks(probs)
    assert masks[0].sum() == 36
    # class 1: the 1-px component has the highest mean
    assert masks[1].sum() == 1
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        clean_masks(probs[0])
