import math
import warnings

import cv2
import numpy as np
import pytest
from scipy import ndimage

from plabel.method.metrics import (
    dice,
    dice_of_probs,
    dice_per_class,
    format_dice_table,
    hd95,
    hd95_per_class,
    summarize_dice,
    summarize_hd95,
)


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


# ---- HD95 ------------------------------------------------------------------------------------------


def _square(shape, top, left, side):
    m = np.zeros(shape, dtype=bool)
    m[top:top + side, left:left + side] = True
    return m


@pytest.mark.parametrize("k", [1, 3, 5])
def test_hd95_squares_offset_by_k(k):
    # 10x10 squares (36 surface pixels each), one shifted k pixels. No surface pixel is farther than k
    # from the other surface, and the leading side's 10 pixels are exactly k away: 10/36 > 5%, so HD95 = k
    truth = _square((30, 30), 8, 8, 10)
    assert hd95(_square((30, 30), 8, 8 + k, 10), truth) == pytest.approx(k)
    assert hd95(_square((30, 30), 8 + k, 8, 10), truth) == pytest.approx(k)
    assert hd95(truth, _square((30, 30), 8 - k, 8, 10)) == pytest.approx(k)
    assert hd95(truth, truth) == 0.0


def test_hd95_single_pixel_difference_interpolates():
    # truth a 3x3 square (8 surface pixels). pred adds the pixel above its top centre, which makes the
    # top centre interior: pred's surface = 7 shared pixels + the new one. Each direction has seven
    # distances 0 and one 1; the 95th percentile (linear) sits at index 0.95 * 7 = 6.65 -> 0.65
    truth = _square((7, 7), 2, 2, 3)
    pred = truth.copy()
    pred[1, 3] = True
    assert hd95(pred, truth) == pytest.approx(0.65)
    assert hd95(truth, pred) == pytest.approx(0.65)


def test_hd95_spacing_is_row_col():
    # single pixels 3 rows and 4 columns apart
    p = _mask((8, 8), [(0, 0)])
    t = _mask((8, 8), [(3, 4)])
    assert hd95(p, t) == pytest.approx(5.0)
    assert hd95(p, t, spacing=(2.0, 0.5)) == pytest.approx(math.sqrt(6.0 ** 2 + 2.0 ** 2))
    assert hd95(p, t, spacing=(0.5, 2.0)) == pytest.approx(math.sqrt(1.5 ** 2 + 8.0 ** 2))
    # the squares of test_hd95_squares_offset_by_k, shifted 3 columns (x 0.5 mm) or 3 rows (x 2 mm)
    truth = _square((30, 30), 8, 8, 10)
    assert hd95(_square((30, 30), 8, 11, 10), truth, spacing=(2.0, 0.5)) == pytest.approx(1.5)
    assert hd95(_square((30, 30), 11, 8, 10), truth, spacing=(2.0, 0.5)) == pytest.approx(6.0)
    assert hd95(_square((30, 30), 11, 8, 10), truth, spacing=(1.0, 1.0)) == pytest.approx(3.0)


def test_hd95_empty_cases():
    z = np.zeros((6, 5), bool)
    one = _mask((6, 5), [(2, 2)])
    assert hd95(z, z) == 0.0
    assert hd95(z, z, spacing=(2.0, 0.5)) == 0.0
    assert math.isnan(hd95(z, one))
    assert math.isnan(hd95(one, z))


def test_hd95_rejects_bad_shapes_and_spacing():
    a = np.zeros((3, 3), bool)
    with pytest.raises(ValueError, match=r"\(3, 3\).*\(3, 4\)"):
        hd95(a, np.zeros((3, 4), bool))
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        hd95(np.zeros((2, 3, 3), bool), np.zeros((2, 3, 3), bool))
    for bad in [(1.0,), (1.0, 2.0, 3.0), (0.0, 1.0), (1.0, -1.0), (float("nan"), 1.0), 2.0]:
        with pytest.raises(ValueError, match="spacing"):
            hd95(a, a, spacing=bad)


def test_hd95_per_class():
    pred = np.zeros((3, 30, 30), bool)
    truth = np.zeros((3, 30, 30), bool)
    pred[0], truth[0] = _square((30, 30), 8, 12, 10), _square((30, 30), 8, 8, 10)  # offset 4 -> 4
    truth[1, 5, 5] = True                                                         # pred empty -> nan
    # class 2 empty in both -> 0
    out = hd95_per_class(pred, truth)
    assert out.dtype == np.float64 and out.shape == (3,)
    np.testing.assert_allclose(out, [4.0, np.nan, 0.0])
    np.testing.assert_allclose(hd95_per_class(pred, truth, spacing=(2.0, 0.5)), [2.0, np.nan, 0.0])
    with pytest.raises(ValueError, match=r"\(3, 30, 30\).*\(2, 30, 30\)"):
        hd95_per_class(pred, truth[:2])


def _brute_hd95(pred, truth, spacing=(1.0, 1.0)):
    """HD95 by its definition, independently of plabel: surface = a mask pixel with a 4-neighbour outside
    the mask (or outside the image), all pairwise distances, np.percentile of each direction, the max."""
    def surface(m):
        pad = np.pad(m, 1)
        inner = pad[:-2, 1:-1] & pad[2:, 1:-1] & pad[1:-1, :-2] & pad[1:-1, 2:]
        return np.argwhere(m & ~inner) * np.asarray(spacing, float)

    p, t = surface(pred), surface(truth)
    d = np.sqrt(((p[:, None, :] - t[None, :, :]) ** 2).sum(-1))
    return max(np.percentile(d.min(axis=1), 95), np.percentile(d.min(axis=0), 95))


def _random_blob(rng, shape):
    """A random non-empty shape: a filled ellipse, a filled polygon, or a union of ellipses with a hole;
    it may run over the image border."""
    h, w = shape
    m = np.zeros(shape, np.uint8)
    kind = rng.integers(3)
    if kind == 1:
        pts = np.stack([rng.integers(-w // 8, w + w // 8, 6), rng.integers(-h // 8, h + h // 8, 6)], axis=1)
        cv2.fillPoly(m, [pts.astype(np.int32)], 1)
    for _ in range(1 if kind == 0 else (0 if kind == 1 else 3)):
        cv2.ellipse(m, (int(rng.integers(w // 5, w - w // 5)), int(rng.integers(h // 5, h - h // 5))),
                    (int(rng.integers(2, max(3, w // 3))), int(rng.integers(2, max(3, h // 3)))),
                    float(rng.uniform(0, 180)), 0, 360, 1, -1)
    if kind == 2:
        cv2.circle(m, (int(rng.integers(w)), int(rng.integers(h))), int(rng.integers(1, max(2, min(h, w) // 6))), 0, -1)
    if not m.any():
        m[h // 2, w // 2] = 1
    return m.astype(bool)


def test_hd95_matches_brute_force_on_both_paths(monkeypatch):
    # blobs take the KD-tree path, salt-and-pepper masks (dense surfaces) the distance transform
    calls = []
    edt = ndimage.distance_transform_edt
    monkeypatch.setattr(ndimage, "distance_transform_edt", lambda *a, **k: calls.append(1) or edt(*a, **k))
    rng = np.random.default_rng(7)
    for big, small in [((160, 160), (24, 24)), ((130, 210), (19, 33)), ((220, 120), (40, 21))]:
        for spacing in [None, (2.0, 0.5)]:
            p, t = _random_blob(rng, big), _random_blob(rng, big)
            n = len(calls)
            assert hd95(p, t, spacing) == pytest.approx(_brute_hd95(p, t, spacing or (1.0, 1.0)), rel=1e-12)
            assert len(calls) == n
            p, t = rng.random(small) < 0.5, rng.random(small) < 0.3
            assert hd95(p, t, spacing) == pytest.approx(_brute_hd95(p, t, spacing or (1.0, 1.0)), rel=1e-12)
            assert len(calls) == n + 2


@pytest.fixture(scope="module")
def monai_hd95():
    # MONAI is a test dependency (pyproject's `test` extra): a missing monai fails these tests, never skips them
    import torch
    from monai.metrics import compute_hausdorff_distance

    def run(pred, truth, spacing=None):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # empty-mask and deprecation warnings
            out = compute_hausdorff_distance(torch.as_tensor(pred[None, None]), torch.as_tensor(truth[None, None]),
                                             include_background=True, percentile=95, spacing=spacing)
        return float(out[0, 0])

    return run


def test_hd95_matches_monai_on_random_blobs(monai_hd95):
    rng = np.random.default_rng(2024)
    shapes = [(32, 32), (64, 48), (37, 100), (128, 128), (90, 200), (256, 160)]
    cases = [(_random_blob(rng, s), _random_blob(rng, s)) for s in shapes for _ in range(5)]  # 30 pairs
    # and pairs that share most of their area (small HD95), and two noisy ones (the distance-transform path)
    for s in shapes[:3]:
        a = _random_blob(rng, s)
        cases.append((a, ndimage.binary_dilation(a, iterations=int(rng.integers(1, 4))) | _random_blob(rng, s) & a))
    cases += [(rng.random((50, 70)) < 0.5, rng.random((50, 70)) < 0.2)]
    for i, (p, t) in enumerate(cases):
        for spacing in [None, (2.0, 0.5), (0.7, 1.3)]:
            ours, theirs = hd95(p, t, spacing), monai_hd95(p, t, spacing)
            # MONAI computes in float32
            assert ours == pytest.approx(theirs, rel=1e-6, abs=1e-6), (i, p.shape, spacing, ours, theirs)


def test_hd95_empty_conventions_against_monai(monai_hd95):
    z = np.zeros((9, 9), bool)
    a = _square((9, 9), 2, 2, 4)
    # exactly one empty: MONAI's surface distances are all inf and torch.quantile makes them nan; so do we
    assert math.isnan(monai_hd95(z, a)) and math.isnan(hd95(z, a))
    assert math.isnan(monai_hd95(a, z)) and math.isnan(hd95(a, z))
    # both empty: MONAI gives nan (no distances at all); plabel scores the agreement as 0.0
    assert math.isnan(monai_hd95(z, z)) and hd95(z, z) == 0.0


def test_summarize_hd95_hand_numbers():
    nan = float("nan")
    per_image = np.array([[1.0, 4.0], [3.0, nan], [nan, nan]])
    s = summarize_hd95(per_image, ["lung", "heart"])
    # per-image means over non-nan classes: 2.5, 3.0 (the all-nan image is left out)
    assert s["mean_hd95"] == pytest.approx(2.75)
    assert s["std_hd95"] == pytest.approx(0.25)
    assert s["per_class"] == pytest.approx({"lung": 2.0, "heart": 4.0})
    assert s["per_class_std"] == pytest.approx({"lung": 1.0, "heart": 0.0})
    assert s["n_nan"] == {"lung": 1, "heart": 2}
    assert s["n_images"] == 3
    e = summarize_hd95(np.full((2, 1), nan), ["lung"])
    assert math.isnan(e["mean_hd95"]) and math.isnan(e["per_class"]["lung"]) and e["n_nan"] == {"lung": 2}
    assert math.isnan(summarize_hd95(np.zeros((0, 1)), ["lung"])["mean_hd95"])
    with pytest.raises(ValueError, match=r"\(3, 2\)"):
        summarize_hd95(per_image, ["a", "b", "c"])


def test_format_dice_table_with_hd95_section():
    classes = ["lung", "heart"]
    rows = {"teacher": summarize_dice(np.array([[1.0, 0.5], [0.5, 0.0]]), classes)}
    plain = format_dice_table(rows, classes)
    assert format_dice_table(rows, classes, hd95=None) == plain
    hd = {"teacher": summarize_hd95(np.array([[1.0, 4.0], [3.0, np.nan]]), classes)}
    text = format_dice_table(rows, classes, hd95=hd)
    assert text.startswith(plain + "\n\nHD95 (px)\n")
    lines = text.splitlines()[len(plain.splitlines()) + 2:]
    assert len(lines) == 3
    assert lines[0].split()[:3] == ["model", "lung", "heart"] and set(lines[1]) <= {"-", " "}
    assert lines[2].startswith("teacher") and "2.00" in lines[2] and "4.00 (1 nan)" in lines[2]
    assert "2.75 ± 0.25" in lines[2] and lines[2].endswith("2")
    assert "HD95 (mm)" in format_dice_table(rows, classes, hd95=hd, hd95_unit="mm")
    with pytest.raises(ValueError, match=r"HD95 row 'teacher' lacks classes \['heart'\]"):
        format_dice_table(rows, classes, hd95={"teacher": summarize_hd95(np.ones((1, 1)), ["lung"])})
