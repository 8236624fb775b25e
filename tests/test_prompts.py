import cv2
import numpy as np
import pytest

from plabel.method.prompts import extract_prompts, interior_point, mask_box, positive_point


def test_box_is_inclusive_pixel_extent():
    m = np.zeros((10, 10), bool)
    m[2:5, 3:8] = True
    np.testing.assert_array_equal(mask_box(m), [3, 2, 7, 4])


def test_centroid_used_when_inside():
    m = np.zeros((9, 9), bool)
    m[2:7, 1:6] = True  # centroid x=3, y=4
    np.testing.assert_allclose(interior_point(m), [3.0, 4.0])


def test_non_convex_mask_centroid_outside_uses_farthest_interior_point():
    # A "U": two thick legs joined at the bottom. Centroid lies in the empty middle.
    m = np.zeros((21, 21), bool)
    m[2:19, 2:7] = True  # left leg, 5 wide
    m[2:19, 14:19] = True  # right leg
    m[14:19, 2:19] = True  # bottom bar
    ys, xs = np.nonzero(m)
    cy, cx = ys.mean(), xs.mean()
    assert not m[int(round(cy)), int(round(cx))]
    p = interior_point(m)
    x, y = int(p[0]), int(p[1])
    assert m[y, x]
    # the point is as deep as the deepest pixel: distance >= 2.5 px from background (5-px-wide strokes)

    dist = cv2.distanceTransform(np.pad(m.astype(np.uint8), 1), cv2.DIST_L2, 5)[1:-1, 1:-1]
    assert dist[y, x] == pytest.approx(dist.max())
    assert dist[y, x] >= 2.5


def test_positive_point_avoids_overlap_with_other_classes():
    masks = np.zeros((2, 12, 12), bool)
    masks[0, 0:12, 0:8] = True  # class 0
    masks[1, 0:12, 4:12] = True  # class 1 overlaps columns 4..7
    p0 = positive_point(masks, 0)
    p1 = positive_point(masks, 1)
    # exclusive parts: class 0 columns 0..3 (centroid x=1.5), class 1 columns 8..11 (x=9.5)
    np.testing.assert_allclose(p0, [1.5, 5.5])
    np.testing.assert_allclose(p1, [9.5, 5.5])


def test_fully_covered_class_falls_back_to_own_mask():
    masks = np.zeros((2, 10, 10), bool)
    masks[0, 2:8, 2:8] = True
    masks[1, 4:6, 4:6] = True  # entirely inside class 0
    np.testing.assert_allclose(positive_point(masks, 1), [4.5, 4.5])


def test_extract_prompts_negatives_are_other_classes_points_and_absent_class_invalid():
    masks = np.zeros((3, 16, 16), bool)
    masks[0, 1:5, 1:5] = True
    masks[2, 10:14, 8:12] = True  # class 1 absent
    pr = extract_prompts(masks)
    np.testing.assert_array_equal(pr.valid, [True, False, True])
    np.testing.assert_array_equal(pr.boxes[0], [1, 1, 4, 4])
    np.testing.assert_array_equal(pr.boxes[1], [0, 0, 0, 0])
    np.testing.assert_array_equal(pr.boxes[2], [8, 10, 11, 13])
    assert pr.points.shape == (3, 2, 2)
    np.testing.assert_allclose(pr.points[0], [[2.5, 2.5], [9.5, 11.5]])
    np.testing.assert_allclose(pr.points[2], [[9.5, 11.5], [2.5, 2.5]])
    np.testing.assert_array_equal(pr.point_labels[0], [1, 0])
    np.testing.assert_array_equal(pr.point_labels[1], [-1, -1])


def test_extract_prompts_no_class_present():
    pr = extract_prompts(np.zeros((2, 5, 5), bool))
    assert not pr.valid.any() and pr.points.shape == (2, 1, 2) and (pr.point_labels == -1).all()
