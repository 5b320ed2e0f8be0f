"""python -m mister_jax.compare: a paired comparison of two runs on the same test utterances."""

import numpy as np
import pytest
from conftest import tiny_config

from mister_jax import compare


def _write(run, ids, labels, predictions, names=("a", "b", "c")):
    run.mkdir(parents=True, exist_ok=True)
    conversations = [i.split("-")[0] for i in ids]
    compare.write_test_predictions(run / compare.PREDICTIONS, ids, conversations, labels, predictions, names)


def _case(rng, conversations=30):
    ids = [f"c{c}-u{u}" for c in range(conversations) for u in range(5)]
    labels = rng.integers(0, 3, len(ids))
    return ids, labels


def test_a_better_run_is_better_with_an_interval_above_zero(tmp_path, capsys):
    rng = np.random.default_rng(0)
    ids, labels = _case(rng)
    good = np.stack([np.where(rng.random(len(ids)) < 0.9, labels, (labels + 1) % 3) for _ in range(2)])
    bad = np.stack([np.where(rng.random(len(ids)) < 0.5, labels, (labels + 1) % 3) for _ in range(2)])
    _write(tmp_path / "a", ids, labels, good)
    _write(tmp_path / "b", ids, labels, bad)
    assert compare.main([str(tmp_path / "a"), str(tmp_path / "b"), "--draws", "300"]) == 0
    table = capsys.readouterr().out
    assert "| A − B |" in table and "2 seeds paired" in table
    result = compare.compare_runs(tmp_path / "a", tmp_path / "b", draws=300)
    assert result["difference"]["low"] > 0 and result["difference"]["p_value"] < 0.01
    assert result["runs"]["A"]["mean"] > result["runs"]["B"]["mean"]


def test_a_run_compared_with_itself_differs_by_zero_with_p_one(tmp_path):
    rng = np.random.default_rng(2)
    ids, labels = _case(rng)
    _write(tmp_path / "a", ids, labels, np.stack([rng.integers(0, 3, len(ids)) for _ in range(3)]))
    d = compare.compare_runs(tmp_path / "a", tmp_path / "a", draws=200)["difference"]
    assert d["difference"] == 0 and d["low"] == d["high"] == 0 and d["p_value"] == 1.0


def test_runs_on_different_test_utterances_are_refused_naming_the_first(tmp_path, capsys):
    rng = np.random.default_rng(1)
    ids, labels = _case(rng)
    _write(tmp_path / "a", ids, labels, labels[None])
    other = list(ids)
    other[7] = "c1-x"
    _write(tmp_path / "b", other, labels, labels[None])
    assert compare.main([str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "utterance 7: 'c1-u2' against 'c1-x'" in err[0]


def test_a_run_without_predictions_is_one_line(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    assert compare.main([str(tmp_path / "a"), str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "test_predictions.npz: missing" in err[0]


def test_training_writes_the_predictions_its_reported_test_f1_comes_from(tmp_path, tiny_features, compile_cache):
    from mister_jax import train_and_evaluate

    results = train_and_evaluate(tiny_config(1), tiny_features / "demo", tmp_path / "run", cache_dir=compile_cache)
    saved = compare.read_test_predictions(tmp_path / "run")
    from sklearn.metrics import f1_score

    per_seed = [
        f1_score(saved["labels"], p, labels=np.arange(len(saved["label_names"])), average="weighted", zero_division=0)
        for p in saved["predictions"]
    ]
    assert per_seed == pytest.approx(results["test"]["weighted_f1"]["per_seed"], abs=1e-12)
    ci = results["test"]["weighted_f1_interval"]
    assert ci["unit"] == "conversation" and len(ci["per_seed"]) == 2
    assert ci["pooled"]["low"] <= results["test"]["weighted_f1"]["mean"] <= ci["pooled"]["high"]
