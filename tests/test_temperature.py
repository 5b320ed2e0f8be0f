"""Temperature scaling (Guo et al., 2017): one T per head fitted on validation by minimising the NLL,
checked against SciPy's bounded scalar minimiser, on an over-confident synthetic model whose true
temperature is known, and end to end on a tiny trained run."""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import CACHE, TINY, set_flags, tiny_store
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax

from mister_jax import main as train_cli
from mister_jax import predict as predict_cli
from mister_jax import temperature as temperature_cli
from mister_jax.calibration import apply_temperature, fit_temperature, read_temperatures
from mister_jax.errors import UsageError
from mister_jax.metrics import reliability

TRUE_T = 3.0


def _overconfident(n: int, seed: int):
    """Labels drawn from softmax(z) (so z is calibrated) and the probabilities softmax(TRUE_T z) of a model
    that is over-confident by exactly TRUE_T."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 5)) * 1.5
    labels = np.array([rng.choice(5, p=p) for p in softmax(z, axis=-1)])
    return softmax(TRUE_T * z, axis=-1).astype(np.float32), labels


def test_fitted_temperature_minimises_the_nll_as_scipy_finds_it():
    probs, labels = _overconfident(2_000, seed=0)
    logits = np.log(probs.astype(np.float64))

    def nll(t):
        return -np.mean(log_softmax(logits / t, axis=-1)[np.arange(len(labels)), labels])

    reference = minimize_scalar(nll, bounds=(0.05, 20.0), method="bounded", options={"xatol": 1e-8}).x
    np.testing.assert_allclose(fit_temperature(probs, labels), reference, rtol=1e-4)


def test_recovers_the_temperature_of_an_overconfident_model():
    probs, labels = _overconfident(20_000, seed=1)
    assert abs(fit_temperature(probs, labels) - TRUE_T) < 0.15


def test_scaling_keeps_every_prediction_and_t_one_is_the_identity():
    probs, _ = _overconfident(500, seed=2)
    np.testing.assert_array_equal(apply_temperature(probs, 2.7).argmax(-1), probs.argmax(-1))
    np.testing.assert_allclose(apply_temperature(probs, 1.0), probs, atol=1e-6)


def test_temperature_fitted_on_validation_lowers_the_test_ece():
    val_probs, val_labels = _overconfident(5_000, seed=3)
    test_probs, test_labels = _overconfident(5_000, seed=4)
    t = fit_temperature(val_probs, val_labels)
    before = reliability(test_probs, test_labels)["ece"]
    after = reliability(apply_temperature(test_probs, t), test_labels)["ece"]
    assert after < 0.5 * before


def test_missing_temperatures_name_the_command_that_fits_them(tmp_path):
    with pytest.raises(
        UsageError, match=r"temperature.json: missing — fit them with `python -m mister_jax.temperature"
    ):
        read_temperatures(tmp_path, 0)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("temperature")
    tiny_store(root / "features")
    argv = ["--dataset", "demo", "--features", str(root / "features"), "--out", str(root / "run")]
    flags = ["--epochs", "2", "--seeds", "2", "--quiet", "--jax-cache", CACHE, *set_flags(TINY)]
    assert train_cli.main(argv + flags) == 0
    return root


def test_the_command_writes_one_positive_temperature_per_seed_and_head(run, capsys):
    argv = ["--run", str(run / "run"), "--dataset", "demo", "--features", str(run / "features")]
    assert temperature_cli.main(argv + ["--jax-cache", CACHE]) == 0
    per_seed = json.loads(Path(run / "run" / "temperature.json").read_text())["per_seed"]
    assert set(per_seed) == {"0", "1"}
    for heads in per_seed.values():
        assert set(heads) == {"speech", "text", "multimodal", "moe"}
        assert all(t > 0 for t in heads.values())
    assert "test ECE before → after" in capsys.readouterr().out


def test_predict_gives_each_head_its_fitted_temperature_and_keeps_the_predictions(run):
    argv = ["--run", str(run / "run"), "--dataset", "demo", "--features", str(run / "features"), "--seed", "1"]
    argv += ["--jax-cache", CACHE]
    if not (run / "run" / "temperature.json").exists():
        assert temperature_cli.main(argv[:6] + ["--jax-cache", CACHE]) == 0
    assert predict_cli.main(argv + ["--out", str(run / "plain.jsonl")]) == 0
    assert predict_cli.main(argv + ["--out", str(run / "scaled.jsonl"), "--temperature-scaling"]) == 0
    temperatures = json.loads((run / "run" / "temperature.json").read_text())["per_seed"]["1"]
    plain = [json.loads(line) for line in (run / "plain.jsonl").read_text().splitlines()]
    scaled = [json.loads(line) for line in (run / "scaled.jsonl").read_text().splitlines()]
    for p, s in zip(plain, scaled):
        assert s["prediction"] == p["prediction"] and s["gate"] == p["gate"]
        expected = softmax(np.log(np.array(p["probs"])) / temperatures["moe"])
        np.testing.assert_allclose(s["probs"], expected, atol=1e-5)
        for expert, probs in p["experts"].items():
            expected = softmax(np.log(np.array(probs)) / temperatures[expert])
            np.testing.assert_allclose(s["experts"][expert], expected, atol=1e-5)
