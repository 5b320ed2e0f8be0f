"""A missing or degraded modality (mister_jax.robustness) and python -m mister_jax.evaluate."""

import json

import jax
import numpy as np
import pytest
from conftest import CACHE, train_args

from mister_jax import augmentation, evaluate, robustness
from mister_jax.input_pipeline import SplitData


def _split(rng):
    return SplitData(
        name="test",
        features={
            "speech": rng.standard_normal((10, 3)).astype(np.float32),
            "text": rng.standard_normal((10, 4)).astype(np.float32),
        },
        labels=rng.integers(0, 2, 10).astype(np.int32),
        utterance_ids=np.arange(10).astype(str),
        conversation_ids=np.repeat(["a", "b"], 5),
        starts=np.array([0, 5]),
        lengths=np.array([5, 5]),
    )


@pytest.mark.parametrize(
    "name, changed",
    [("drop-speech", "speech"), ("drop-text", "text"), ("noise-speech", "speech"), ("noise-text", "text")],
)
def test_a_perturbation_changes_only_its_own_modality(name, changed):
    data = _split(np.random.default_rng(0))
    out = robustness.perturb(data, name, 0.5)
    kept = "text" if changed == "speech" else "speech"
    assert out.features[kept] is data.features[kept]
    assert not np.array_equal(out.features[changed], data.features[changed])
    np.testing.assert_array_equal(out.labels, data.labels)
    if name.startswith("drop"):
        assert not out.features[changed].any()
    else:  # noise of σ times each dimension's spread
        ratio = (out.features[changed] - data.features[changed]).std(axis=0) / data.features[changed].std(axis=0)
        assert np.all((ratio > 0.2) & (ratio < 1.0))


def test_perturbations_parse_and_bad_ones_are_named():
    assert robustness.parse_perturbations("none, drop-text,noise-speech=0.25") == [
        ("none", 0.0),
        ("drop-text", 0.0),
        ("noise-speech", 0.25),
    ]
    for bad, message in (
        ("blur-text", "unknown"),
        ("noise-text", "expected noise-text=σ"),
        ("drop-text=1", "no value"),
    ):
        with pytest.raises(ValueError, match=message):
            robustness.parse_perturbations(bad)


def test_modality_dropout_zeroes_one_whole_modality_of_some_conversations():
    speech, text = jax.numpy.ones((400, 3, 2)), jax.numpy.ones((400, 3, 5))
    s, t = (np.asarray(x) for x in augmentation.apply_modality_dropout(speech, text, 0.5, jax.random.key(0)))
    speech_gone, text_gone = ~s.any(axis=(1, 2)), ~t.any(axis=(1, 2))
    assert not np.any(speech_gone & text_gone)  # never both
    assert np.all(s.all(axis=(1, 2)) | speech_gone) and np.all(t.all(axis=(1, 2)) | text_gone)  # whole conversations
    assert 0.4 < (speech_gone | text_gone).mean() < 0.6 and 0.35 < speech_gone.mean() / 0.5 < 0.65


def test_evaluate_scores_each_perturbation_and_none_reproduces_the_run(tmp_path, tiny_features, capsys):
    from mister_jax import main as train_main

    run = tmp_path / "run"
    assert train_main.main(train_args(tiny_features, run, 1)) == 0
    code = evaluate.main(
        [
            "--run",
            str(run),
            "--dataset",
            "demo",
            "--features",
            str(tiny_features),
            "--perturb",
            "none,drop-speech",
            "--jax-cache",
            CACHE,
        ]
    )
    assert code == 0 and "| drop-speech |" in capsys.readouterr().out
    result = json.loads((run / "robustness.json").read_text())
    reported = json.loads((run / "results.json").read_text())["test"]["weighted_f1"]
    assert result["perturbations"]["none"]["experts"]["moe"]["per_seed"] == pytest.approx(reported["per_seed"])
    assert result["missing_modality_input"] == "zeros" and (run / "robustness.png").stat().st_size > 0
    assert (
        evaluate.main(["--run", str(run), "--dataset", "demo", "--features", str(tiny_features), "--perturb", "blur"])
        == 2
    )
