"""Bootstrap intervals over conversations (mister_jax.uncertainty) against sklearn and against their
nominal coverage."""

import numpy as np
import pytest
from sklearn.metrics import f1_score

from mister_jax import uncertainty


def _conversations(rng, count, classes, accuracy, lengths=(3, 13)):
    """Conversations of 3-12 utterances (by default) whose emotion persists and whose difficulty varies: each has its
    own accuracy around `accuracy`, and a wrong utterance is predicted as a random class."""
    labels, predictions, ids = [], [], []
    for c in range(count):
        n = rng.integers(*lengths)
        truth = np.repeat(rng.integers(0, classes), n)
        wrong = rng.random(n) > np.clip(accuracy + rng.uniform(-0.4, 0.4), 0.0, 1.0)
        labels.append(truth)
        predictions.append(np.where(wrong, rng.integers(0, classes, n), truth))
        ids += [f"c{c}"] * n
    return np.concatenate(labels), np.concatenate(predictions), np.array(ids)


def test_weighted_f1_from_a_confusion_matrix_equals_sklearn():
    rng = np.random.default_rng(0)
    labels, predictions = rng.integers(0, 5, 300), rng.integers(0, 4, 300)  # class 4 never predicted
    confusion = np.zeros((5, 5))
    np.add.at(confusion, (labels, predictions), 1)
    expected = f1_score(labels, predictions, labels=np.arange(5), average="weighted", zero_division=0)
    assert uncertainty.weighted_f1_from_confusion(confusion) == pytest.approx(expected, abs=1e-12)


def test_per_conversation_confusions_add_up_to_the_split_confusion():
    rng = np.random.default_rng(1)
    labels, predictions, ids = _conversations(rng, 20, 4, 0.6)
    per = uncertainty.conversation_confusions(labels, predictions, ids, 4)
    assert per.shape == (20, 16)
    whole = np.zeros((4, 4))
    np.add.at(whole, (labels, predictions), 1)
    np.testing.assert_array_equal(per.sum(axis=0).reshape(4, 4), whole)
    first = ids == "c0"  # conversations in order of first appearance
    np.testing.assert_array_equal(per[0].reshape(4, 4).sum(), first.sum())


def test_intervals_cover_the_population_value_at_about_their_nominal_rate():
    rng = np.random.default_rng(2)
    population = _conversations(rng, 4000, 4, 0.6)
    truth = f1_score(population[0], population[1], average="weighted")
    starts = np.flatnonzero(np.r_[True, population[2][1:] != population[2][:-1]])
    bounds = np.r_[starts, len(population[2])]
    covered, trials = 0, 200
    for trial in range(trials):
        chosen = rng.choice(len(starts), 60, replace=False)  # a test split of 60 conversations
        rows = np.concatenate([np.arange(bounds[c], bounds[c + 1]) for c in chosen])
        labels, predictions, ids = (x[rows] for x in population)
        ci = uncertainty.bootstrap_weighted_f1(labels, predictions[None], ids, 4, draws=400, seed=trial)["pooled"]
        covered += ci["low"] <= truth <= ci["high"]
    assert 0.88 <= covered / trials <= 0.99


def test_resampling_utterances_instead_of_conversations_undercovers():
    rng = np.random.default_rng(2)
    population = _conversations(rng, 4000, 4, 0.6, lengths=(10, 40))  # dialogues as long as IEMOCAP's
    truth = f1_score(population[0], population[1], average="weighted")
    starts = np.flatnonzero(np.r_[True, population[2][1:] != population[2][:-1]])
    bounds = np.r_[starts, len(population[2])]
    covered, trials = 0, 200
    for trial in range(trials):
        chosen = rng.choice(len(starts), 40, replace=False)
        rows = np.concatenate([np.arange(bounds[c], bounds[c + 1]) for c in chosen])
        labels, predictions, _ = (x[rows] for x in population)
        each_its_own = np.arange(len(rows)).astype(str)  # the wrong unit: every utterance alone
        ci = uncertainty.bootstrap_weighted_f1(labels, predictions[None], each_its_own, 4, draws=400, seed=trial)
        covered += ci["pooled"]["low"] <= truth <= ci["pooled"]["high"]
    assert covered / trials < 0.8  # the conversation bootstrap covers this case at about 0.95


def test_the_pooled_interval_of_identical_seeds_is_the_seed_interval():
    rng = np.random.default_rng(3)
    labels, predictions, ids = _conversations(rng, 40, 3, 0.7)
    ci = uncertainty.bootstrap_weighted_f1(labels, np.stack([predictions] * 3), ids, 3, draws=200)
    assert ci["per_seed"][0] == ci["per_seed"][2]
    assert ci["pooled"] == pytest.approx(ci["per_seed"][0], abs=1e-12)


def test_paired_test_finds_a_real_difference_and_not_an_absent_one():
    rng = np.random.default_rng(4)
    labels, good, ids = _conversations(rng, 80, 4, 0.8)
    bad = np.where(rng.random(len(labels)) < 0.3, (labels + 1) % 4, good)  # B wrong on 30 % more
    real = uncertainty.paired_bootstrap(labels, good[None], bad[None], ids, 4, draws=500)
    assert real["difference"] > 0 and real["low"] > 0 and real["p_value"] < 0.01
    same = uncertainty.paired_bootstrap(labels, good[None], good[None], ids, 4, draws=500)
    assert same["difference"] == 0 and same["p_value"] == 1.0


def test_first_difference_names_the_first_utterance_that_differs():
    assert uncertainty.first_difference(["a", "b", "c"], ["a", "x", "c"]) == "utterance 1: 'b' against 'x'"
    assert "3 against 2 utterances" in uncertainty.first_difference(["a", "b", "c"], ["a", "b"])
    assert uncertainty.first_difference(["a"], ["a"]) is None
