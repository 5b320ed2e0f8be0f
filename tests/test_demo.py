"""The built-in demo corpus: deterministic, valid, and shaped like the task (DESIGN §2, issue 2)."""

import numpy as np
import pytest

from bridges import FeatureStore
from bridges.demo import LABEL_NAMES, SPEECH_CONFUSIONS, TEXT_CONFUSIONS, build_demo_store


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return FeatureStore.open(build_demo_store(tmp_path_factory.mktemp("a"), seed=0))


def test_demo_store_is_valid_and_deterministic(demo, tmp_path):
    assert demo.check_values() == []
    again = FeatureStore.open(build_demo_store(tmp_path, seed=0))
    for split in demo.splits:
        np.testing.assert_array_equal(demo.split(split).features("text"), again.split(split).features("text"))
        np.testing.assert_array_equal(demo.split(split).labels, again.split(split).labels)


def test_emotions_persist_along_conversations(demo):
    split = demo.split("train")
    same_as_previous = [
        np.mean(split.labels[c.start + 1 : c.stop] == split.labels[c.start : c.stop - 1]) for c in split.conversations()
    ]
    counts = np.bincount(split.labels, minlength=len(LABEL_NAMES)) / len(split)
    chance = float(np.sum(counts**2))
    assert np.mean(same_as_previous) > chance + 0.4


def test_classes_are_imbalanced(demo):
    counts = np.bincount(demo.split("train").labels, minlength=len(LABEL_NAMES))
    assert counts.min() > 0 and counts.max() > 3 * counts.min()


def _class_mean_distance(split, modality, a, b):
    x, y = np.asarray(split.features(modality)), split.labels
    i, j = LABEL_NAMES.index(a), LABEL_NAMES.index(b)
    return np.linalg.norm(x[y == i].mean(0) - x[y == j].mean(0))


@pytest.mark.parametrize(
    "modality, confused, separated",
    [
        ("text", TEXT_CONFUSIONS, SPEECH_CONFUSIONS),
        ("speech", SPEECH_CONFUSIONS, TEXT_CONFUSIONS),
    ],
)
def test_each_modality_confuses_pairs_the_other_separates(demo, modality, confused, separated):
    split = demo.split("train")
    for a, b in confused:
        for c, d in separated:
            assert _class_mean_distance(split, modality, a, b) < 0.5 * _class_mean_distance(split, modality, c, d)
