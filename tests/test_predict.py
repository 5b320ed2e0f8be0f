"""python -m mister_jax.predict: one JSON line per utterance, independent of --batch-size."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import CACHE, TINY, TINY_DEMO, set_flags, tiny_store

from bridges import FeatureStore
from mister_jax import main as train_cli
from mister_jax import predict as predict_cli

# A test split of 11 conversations: batches of 8 leave a partly filled one, batches of 1 many.
PREDICT_DEMO = dataclasses.replace(TINY_DEMO, conversations=(("train", 8), ("val", 4), ("test", 11)))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    tiny_store(root / "features", PREDICT_DEMO)
    assert (
        train_cli.main(
            [
                "--dataset",
                "demo",
                "--features",
                str(root / "features"),
                "--out",
                str(root / "run"),
                "--epochs",
                "2",
                "--seeds",
                "2",
                "--quiet",
                "--jax-cache",
                CACHE,
                *set_flags(TINY),
            ]
        )
        == 0
    )
    return root


def _predict(run: Path, batch_size: int, *extra: str) -> list[dict]:
    out = run / f"pred-{batch_size}{''.join(extra)}.jsonl"
    assert (
        predict_cli.main(
            [
                "--run",
                str(run / "run"),
                "--dataset",
                "demo",
                "--features",
                str(run / "features"),
                "--batch-size",
                str(batch_size),
                "--out",
                str(out),
                "--jax-cache",
                CACHE,
                *extra,
            ]
        )
        == 0
    )
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_probabilities_do_not_depend_on_batch_size(run):
    one, eight = _predict(run, 1), _predict(run, 8)
    assert [r["utterance_id"] for r in one] == [r["utterance_id"] for r in eight]
    for key in ("probs", "gate"):
        np.testing.assert_allclose([r[key] for r in one], [r[key] for r in eight], atol=1e-5)
    for expert in ("speech", "text", "multimodal"):
        np.testing.assert_allclose(
            [r["experts"][expert] for r in one], [r["experts"][expert] for r in eight], atol=1e-5
        )


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
    f1 = weighted_f1(
        np.array([r["label_id"] for r in rows]),
        np.array([r["prediction_id"] for r in rows]),
        len(results["label_names"]),
    )
    assert f1 == pytest.approx(results["test"]["weighted_f1"]["per_seed"][seed], abs=1e-9)


def test_missing_run_is_a_one_line_error(tmp_path, capsys):
    code = predict_cli.main(["--run", str(tmp_path / "nothing"), "--dataset", "demo", "--out", str(tmp_path / "p")])
    err = capsys.readouterr().err
    assert code == 2 and "no run_config.json" in err and "Traceback" not in err


def test_predict_split_gives_every_row_once_with_the_probabilities_of_the_command_line(run):
    import jax

    from mister_jax.checkpoint import RunCheckpoints
    from mister_jax.config import ModelConfig, TrainConfig
    from mister_jax.input_pipeline import load_split
    from mister_jax.params import param_shapes
    from mister_jax.predict import predict_split

    config = json.loads((run / "run" / "run_config.json").read_text())
    model_cfg = ModelConfig(**config["model"])
    ckpt = RunCheckpoints(run / "run" / "checkpoints")
    _, params = ckpt.restore_best(
        1, jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), param_shapes(model_cfg))
    )
    ckpt.close()
    data = load_split(FeatureStore.open(run / "features" / "demo"), "test", ("speech", "text"))
    rows = dict(predict_split(params, model_cfg, data, TrainConfig(**config["train"]), batch_size=1))
    assert sorted(rows) == list(range(data.num_utterances))
    lines = _predict(run, 8, "--seed", "1")
    np.testing.assert_allclose(
        [rows[i]["moe"] for i in range(data.num_utterances)], [r["probs"] for r in lines], atol=1e-5
    )


def test_without_stream_dataset_and_out_are_required_in_one_line(tmp_path, capsys):
    code = predict_cli.main(["--run", str(tmp_path / "run"), "--out", str(tmp_path / "p.jsonl")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--dataset is required (or pass --stream" in err
