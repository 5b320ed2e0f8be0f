"""python -m mister_jax.predict: one JSON line per utterance, independent of --batch-size."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from bridges import FeatureStore
from bridges.demo import DemoConfig, build_demo_store
from mister_jax import predict as predict_cli
from mister_jax import train as train_cli

CACHE = os.environ.get("MISTER_JAX_CACHE", str(Path.home() / ".cache" / "mister" / "jax"))
TINY = ["can_hidden=8", "fusion_dim=8", "attention_dim=8", "attention_heads=2", "gru_layers=1",
        "fusion_layers=1", "num_buckets=1", "batch_size=4", "learning_rate=0.01"]
TINY_DEMO = DemoConfig(conversations=(("train", 8), ("val", 4), ("test", 11)), min_length=3, max_length=6,
                       text_dim=6, speech_dim=5)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    build_demo_store(root / "features", config=TINY_DEMO)
    args = ["--dataset", "demo", "--features", str(root / "features"), "--out", str(root / "run"), "--epochs", "2",
            "--seeds", "2", "--quiet", "--jax-cache", CACHE]
    for item in TINY:
        args += ["--set", item]
    assert train_cli.main(args) == 0
    return root


def _predict(run: Path, batch_size: int, *extra: str) -> list[dict]:
    out = run / f"pred-{batch_size}{''.join(extra)}.jsonl"
    assert predict_cli.main(["--run", str(run / "run"), "--dataset", "demo", "--features", str(run / "features"),
                             "--batch-size", str(batch_size), "--out", str(out), "--jax-cache", CACHE, *extra]) == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_probabilities_do_not_depend_on_batch_size(run):
    one, eight = _predict(run, 1), _predict(run, 8)
    assert [r["utterance_id"] for r in one] == [r["utterance_id"] for r in eight]
    for key in ("probs", "gate"):
        np.testing.assert_allclose([r[key] for r in one], [r[key] for r in eight], atol=1e-5)
    for expert in ("speech", "text", "multimodal"):
        np.testing.assert_allclose([r["experts"][expert] for r in one], [r["experts"][expert] for r in eight],
                                   atol=1e-5)


def test_one_line_per_utterance_in_store_order_with_probabilities(run):
    rows = _predict(run, 8)
    test = FeatureStore.open(run / "features" / "demo").split("test")
    names = FeatureStore.open(run / "features" / "demo").label_names
    assert [r["utterance_id"] for r in rows] == list(test.utterance_ids)
    assert [r["conversation_id"] for r in rows] == list(test.conversation_ids)
    assert [r["label"] for r in rows] == [names[y] for y in test.labels]
    probs = np.array([r["probs"] for r in rows])
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.array([r["gate"] for r in rows]).sum(axis=1), 1.0, atol=1e-5)
    assert [r["prediction"] for r in rows] == [names[i] for i in probs.argmax(axis=1)]
    for r in rows:
        assert set(r["experts"]) == {"speech", "text", "multimodal"} and len(r["probs"]) == len(names)


def test_predictions_of_the_best_seed_reproduce_its_reported_test_f1(run):
    from mister_jax.metrics import weighted_f1

    results = json.loads((run / "run" / "results.json").read_text())
    seed = int(np.argmax(results["val"]["weighted_f1"]["per_seed"]))
    rows = _predict(run, 8, "--seed", str(seed))
    f1 = weighted_f1(np.array([r["label_id"] for r in rows]), np.array([r["prediction_id"] for r in rows]),
                     len(results["label_names"]))
    assert f1 == pytest.approx(results["test"]["weighted_f1"]["per_seed"][seed], abs=1e-9)


def test_missing_run_is_a_one_line_error(tmp_path, capsys):
    code = predict_cli.main(["--run", str(tmp_path / "nothing"), "--dataset", "demo", "--out", str(tmp_path / "p")])
    err = capsys.readouterr().err
    assert code == 2 and "no run_config.json" in err and "Traceback" not in err
