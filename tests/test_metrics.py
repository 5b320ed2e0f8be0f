"""mister_jax.metrics: weighted and per-class F1 (the paper's reported score) on a worked example."""

import numpy as np
import pytest

from mister_jax.metrics import per_class_f1, weighted_f1


def test_weighted_and_per_class_f1_on_a_worked_example():
    # true 0 0 0 1 1 2; predicted 0 0 1 1 2 2 -> per class F1: 0: 2*2/(3+2)=0.8, 1: 2*1/(2+2)=0.5,
    # 2: 2*1/(1+2)=2/3, class 3 absent and never predicted: 0; weighted by support 3, 2, 1, 0.
    y, p = np.array([0, 0, 0, 1, 1, 2]), np.array([0, 0, 1, 1, 2, 2])
    assert per_class_f1(y, p, ["a", "b", "c", "d"]) == pytest.approx({"a": 0.8, "b": 0.5, "c": 2 / 3, "d": 0.0})
    assert weighted_f1(y, p, 4) == pytest.approx((3 * 0.8 + 2 * 0.5 + 1 * 2 / 3) / 6)


def test_confusion_counts_true_classes_in_rows_and_predictions_in_columns():
    from mister_jax.metrics import confusion

    y, p = np.array([0, 0, 0, 1, 1, 2]), np.array([0, 0, 1, 1, 2, 2])
    expected = np.zeros((4, 4), int)
    for t, q in zip(y, p):
        expected[t, q] += 1
    np.testing.assert_array_equal(confusion(y, p, 4), expected)
    assert weighted_f1(np.array([], int), np.array([], int), 4) == 0.0  # an empty split scores 0
