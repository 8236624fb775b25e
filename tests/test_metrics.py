import numpy as np
import pytest

from plabel.method.metrics import dice, dice_of_probs, dice_per_class, format_dice_table, summarize_dice


def _mask(shape, pixels):
    m = np.zeros(shape, dtype=bool)
    for p in pixels:
        m[p] = True
    return m


def test_dice_hand_value():
    # pred 4 pixels, truth 5 pixels, 3 shared -> 2*3/(4+5)
    pred = _mask((4, 4), [(0, 0), (0, 1), (0, 2), (3, 3)])
    truth = _mask((4, 4), [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)])
    assert dice(pred, truth) == pytest.approx(6 / 9)


def test_dice_empty_cases():
    z = np.zeros((3, 3), bool)
    one = _mask((3, 3), [(1, 1)])
    assert dice(z, z) == 1.0
    assert dice(z, z, empty_value=0.0) == 0.0
    assert dice(z, one) == 0.0
    assert dice(one, z) == 0.0
    assert dice(one, one) == 1.0


def test_dice_shape_mismatch_names_shapes():
    with pytest.raises(ValueError, match=r"\(3, 3\).*\(3, 4\)"):
        dice(np.zeros((3, 3), bool), np.zeros((3, 4), bool))


def test_dice_per_class():
    pred = np.zeros((3, 4, 4), bool)
    truth = np.zeros((3, 4, 4), bool)
    pred[0, :2, :2] = True          # 4 px
    truth[0, :2, :3] = True         # 6 px, overlap 4 -> 8/10
    truth[1, 0, 0] = True           # pred empty -> 0
    # class 2 empty in both -> 1
    out = dice_per_class(pred, truth)
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, [0.8, 0.0, 1.0])
    with pytest.raises(ValueError, match=r"\(3, 4, 4\).*\(2, 4, 4\)"):
        dice_per_class(pred, truth[:2])


def test_summarize_dice_hand_numbers():
    per_image = np.array([[1.0, 0.5], [0.5, 0.0]])
    s = summarize_dice(per_image, ["lung", "heart"])
    # per-image means 0.75 and 0.25
    assert s["mean_dice"] == pytest.approx(0.5)
    assert s["std_dice"] == pytest.approx(0.25)
    assert s["per_class"] == pytest.approx({"lung": 0.75, "heart": 0.25})
    assert s["per_class_std"] == pytest.approx({"lung": 0.25, "heart": 0.25})
    assert s["n_images"] == 2
    with pytest.raises(ValueError, match=r"\(2, 2\)"):
        summarize_dice(per_image, ["a", "b", "c"])


def test_format_dice_table():
    classes = ["lung", "heart"]
    rows = {
        "teacher": summarize_dice(np.array([[1.0, 0.5], [0.5, 0.0]]), classes),
        "student": summarize_dice(np.array([[0.9, 0.8]]), classes),
    }
    text = format_dice_table(rows, classes)
    lines = text.splitlines()
    assert len(lines) == 4
    assert lines[0].split()[:3] == ["model", "lung", "heart"]
    assert "75.00" in lines[2] and "25.00" in lines[2] and "50.00 ± 25.00" in lines[2]
    assert lines[3].startswith("student") and "85.00 ± 0.00" in lines[3]


def test_dice_of_probs_thresholds_or_cleans_each_image():
    # image 1: class 0 predicted on 2 pixels (one right of a 2-pixel truth), class 1 empty in both
    p1 = np.zeros((2, 3, 3), np.float32)
    p1[0, 0, 0], p1[0, 0, 1], p1[0, 2, 2] = 0.9, 0.5, 0.7  # 0.5 is not > 0.5
    t1 = np.zeros((2, 3, 3), bool)
    t1[0, 0, 0] = t1[0, 1, 0] = True
    # image 2: class 1 all predicted, truth one pixel -> 2 * 1 / (9 + 1)
    p2 = np.zeros((2, 3, 3), np.float32)
    p2[1] = 0.8
    t2 = np.zeros((2, 3, 3), bool)
    t2[1, 1, 1] = True
    d = dice_of_probs([p1, p2], [t1, t2])
    assert d.dtype == np.float64 and d.shape == (2, 2)
    np.testing.assert_allclose(d, [[2 * 1 / (2 + 2), 1.0], [1.0, 0.2]])
    # clean: only the component with the highest mean probability is kept (the pixel at (0, 0))
    np.testing.assert_allclose(dice_of_probs([p1], [t1], clean=True)[0], [2 * 1 / (1 + 2), 1.0])
    assert dice_of_probs([], []).shape == (0, 0)
    with pytest.raises(ValueError, match="2 probability maps but 1"):
        dice_of_probs([p1, p2], [t1])
