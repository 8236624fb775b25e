"""plabel.training.selection: which epoch a training run keeps (mean and guarded rules), hand-made Dice."""
import math

import numpy as np
import pytest

from plabel.jobs.stages import student_note
from plabel.training.selection import EpochSelector, describe_guard, guard_average, guard_note, lost_classes


def test_mean_rule_keeps_the_highest_mean_and_the_first_of_ties():
    s = EpochSelector.for_rule("mean")
    assert s.offer(0, [0.5, 0.7])  # mean 0.6: the first epoch is always kept
    assert not s.offer(1, [0.9, 0.1])  # 0.5
    assert s.offer(2, [0.8, 0.8])  # 0.8
    assert not s.offer(3, [0.7, 0.9])  # 0.8 again: a tie keeps epoch 2
    assert (s.best_epoch, s.best_score) == (2, pytest.approx(0.8))


def test_mean_rule_ignores_a_reference_and_skips_non_finite_epochs():
    s = EpochSelector.for_rule("mean", reference=[1.0, 1.0])
    assert s.reference is None
    assert s.offer(0, [math.nan, 0.5]) and s.best_score == -1.0  # something is kept...
    assert s.offer(1, [0.2, 0.2])  # ...and the first finite epoch replaces it
    assert not s.offer(2, [math.nan, 1.0])
    assert s.best_epoch == 1


def test_guarded_rule_starts_at_the_reference_and_refuses_epochs_that_lose_a_class():
    s = EpochSelector.for_rule("guarded", reference=[0.8, 0.6], tolerance=0.01)
    assert (s.best_epoch, s.best_score) == (-1, pytest.approx(0.7))  # the starting weights
    assert s.offer(0, [0.9, 0.59])  # class 1 fell 0.01 = tolerance: admissible, mean 0.745
    assert not s.offer(1, [1.0, 0.55])  # mean 0.775 but class 1 fell 0.05
    assert not s.offer(2, [0.85, 0.6])  # admissible, mean 0.725 < 0.745
    assert (s.best_epoch, s.best_score) == (0, pytest.approx(0.745))


def test_guarded_rule_keeps_the_starting_weights_when_every_epoch_loses_a_class():
    s = EpochSelector.for_rule("guarded", reference=[0.9, 0.5], tolerance=0.0)
    for e, d in enumerate([[0.95, 0.49], [0.99, 0.3], [0.5, 0.9], [math.nan, 1.0]]):
        assert not s.offer(e, d)
    assert (s.best_epoch, s.best_score) == (-1, pytest.approx(0.7))
    assert not s.offer(4, None)  # no validation data: nothing to judge by, the reference stays


def test_guarded_rule_without_reference_is_the_mean_rule():
    s = EpochSelector.for_rule("guarded", reference=None)
    assert s.best_epoch is None and s.offer(0, [0.1, 0.1]) and s.best_epoch == 0


def test_state_round_trip_resumes_the_same_decisions():
    s = EpochSelector.for_rule("guarded", reference=[0.8, 0.6], tolerance=0.01)
    s.offer(0, [0.9, 0.7])
    r = EpochSelector.from_state(s.state())
    assert (r.best_epoch, r.best_score, r.tolerance) == (0, pytest.approx(0.8), 0.01)
    np.testing.assert_array_equal(r.reference, [0.8, 0.6])
    assert not r.offer(1, [1.0, 0.5]) and r.offer(2, [0.9, 0.8])


@pytest.mark.parametrize("kwargs, match", [({"rule": "best"}, "rule"),
                                           ({"rule": "guarded", "reference": [0.5, math.nan]}, "reference"),
                                           ({"rule": "guarded", "reference": [0.5], "tolerance": -0.1}, "tolerance")])
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EpochSelector.for_rule(**kwargs)


def test_a_per_class_vector_of_another_length_is_refused():
    s = EpochSelector.for_rule("guarded", reference=[0.5, 0.5])
    with pytest.raises(ValueError, match="shape"):
        s.offer(0, [0.5, 0.5, 0.5])


def test_lost_classes_names_every_class_below_the_reference_by_more_than_the_tolerance():
    ref = [0.80, 0.60, 0.90, 0.50]
    assert lost_classes([0.80, 0.60, 0.90, 0.50], ref, 0.01) == []
    assert lost_classes([0.795, 0.59, 0.95, 0.40], ref, 0.01) == [3]  # 0.005 and exactly 0.01 below: kept
    assert lost_classes([0.70, 0.60, math.nan, 0.49], ref, 0.005) == [0, 2, 3]
    assert lost_classes([0.70, 0.55, 0.90, 0.50], ref, 0.0) == [0, 1]
    with pytest.raises(ValueError, match=r"shape \(3,\), the reference \(4,\)"):
        lost_classes([0.8, 0.6, 0.9], ref)


def test_guard_average_keeps_the_average_or_the_best_member():
    ref = [0.80, 0.60]
    assert guard_average([0.81, 0.596], ref, [0.7, 0.9], 0.005) == ([], None)  # nothing lost: the average
    assert guard_average([0.81, 0.59], ref, [0.7, 0.9, 0.9], 0.005) == ([1], 1)  # lost: the best, first of ties
    assert guard_average([math.nan, 0.7], ref, [None, 0.2], 0.005) == ([0], 1)  # None counts lowest


def test_guard_note_names_the_best_refused_epoch_and_what_it_lost():
    ref = [0.80, 0.60, 0.90]
    epochs = [(0, [0.70, 0.70, 0.90]),   # mean 0.7667, lost a (0.10)
              (1, [0.79, 0.75, 0.85]),   # mean 0.7967: the best, lost c by 0.05 (a by 0.01 too)
              (2, None)]                 # no validation: not a candidate
    note = guard_note(ref, epochs, ["a", "b", "c"], tolerance=0.005)
    assert note == {"epoch": 2, "mean_val_dice": 0.7967, "start_mean_val_dice": 0.7667,
                    "lost": {"a": 0.01, "c": 0.05}}
    assert describe_guard(note) == ("kept the teacher's weights: every epoch lost a class on the validation "
                                    "images; the best one (epoch 2, mean Dice 0.7967 vs 0.7667) lost a by 0.0100, "
                                    "c by 0.0500")
    assert guard_note(ref, [(0, None)], ["a", "b", "c"]) is None
    # an epoch kept every class but scored a lower mean than the starting weights (0.7667): that is why
    below = [(0, [0.70, 0.70, 0.90]), (1, [0.80, 0.55, 0.90]), (2, [0.79, 0.58, 0.895])]  # 0: lost a; 1: lost b
    note = guard_note(ref, below, ["a", "b", "c"], tolerance=0.02)
    assert note == {"epoch": 3, "mean_val_dice": 0.755, "start_mean_val_dice": 0.7667, "lost": {}}
    assert describe_guard(note) == ("kept the teacher's weights: no epoch that kept every class on the validation "
                                    "images beat its mean validation Dice; the best one (epoch 3, mean Dice 0.7550 "
                                    "vs 0.7667) stayed below it")


def test_student_note_says_when_the_student_is_the_teacher_or_one_member():
    guard = {"epoch": 3, "mean_val_dice": 0.9, "start_mean_val_dice": 0.8, "lost": {"heart": 0.02}}
    assert student_note({"best_epoch": 5}) is None
    assert student_note({"guard": guard}).startswith("the student is the teacher: guarded selection kept the teacher's")
    members = [{"guard": guard}, {"guard": guard}]
    assert "every soup member kept the teacher's weights" in student_note({"soup": members})
    assert student_note({"soup": [{"guard": guard}, {"guard": None}]}) == (
        "1 of 2 soup members kept the teacher's weights (guarded selection)")
    fell = {"soup": [{}, {}], "soup_val_dice": {"per_class": {"heart": 0.85, "lung": 0.95}},
            "soup_guard": {"kept": "student-1.pt", "lost_classes": ["heart"], "tolerance": 0.005,
                           "teacher_val_dice": {"heart": 0.88, "lung": 0.94}}}
    assert student_note(fell) == ("the student is one soup member (student-1.pt), not the average: the average "
                                  "fell below the teacher on the validation images (tolerance 0.005): heart by 0.0300")
    fell["soup_guard"]["kept"] = "soup"
    assert student_note(fell) is None
