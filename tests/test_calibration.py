"""Calibration of the predicted probabilities (mister_jax.metrics.reliability; Guo et al., 2017)."""

import numpy as np
import pytest

from mister_jax.evaluate import pooled_reliability
from mister_jax.metrics import reliability


def _ece_by_loops(probs, labels, bins):
    total, ece = len(labels), 0.0
    for b in range(bins):
        low, high = b / bins, (b + 1) / bins
        members = [i for i in range(total) if low <= probs[i].max() < high or (b == bins - 1 and probs[i].max() == 1)]
        if members:
            accuracy = np.mean([probs[i].argmax() == labels[i] for i in members])
            confidence = np.mean([probs[i].max() for i in members])
            ece += len(members) / total * abs(accuracy - confidence)
    return ece


def test_expected_calibration_error_equals_the_binned_definition():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((400, 4)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    labels = rng.integers(0, 4, 400)
    assert reliability(probs, labels, bins=10)["ece"] == pytest.approx(_ece_by_loops(probs, labels, 10), abs=1e-9)


def test_a_calibrated_predictor_has_an_ece_near_zero_and_an_overconfident_one_does_not():
    rng = np.random.default_rng(1)
    confidence = rng.uniform(0.5, 1.0, 20000)
    correct = rng.random(20000) < confidence  # right exactly as often as it is confident
    probs = np.stack([confidence, 1 - confidence], axis=1)
    labels = np.where(correct, 0, 1)
    assert reliability(probs, labels)["ece"] < 0.02
    overconfident = np.stack([np.full(20000, 0.99), np.full(20000, 0.01)], axis=1)
    assert reliability(overconfident, labels)["ece"] == pytest.approx(0.99 - correct.mean(), abs=1e-9)


def test_pooling_seeds_weights_each_bin_by_its_counts():
    a = {"ece": 0.1, "count": [2, 0], "confidence": [0.6, 0.0], "accuracy": [0.5, 0.0]}
    b = {"ece": 0.3, "count": [6, 1], "confidence": [0.8, 0.9], "accuracy": [1.0, 1.0]}
    pooled = pooled_reliability([a, b])
    assert pooled["count"] == [8, 1]
    assert pooled["confidence"] == pytest.approx([0.75, 0.9]) and pooled["accuracy"] == pytest.approx([0.875, 1.0])
    assert pooled["ece"]["mean"] == pytest.approx(0.2)
