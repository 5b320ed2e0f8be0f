"""`mister_jax.train_and_evaluate(config, store, workdir)`: a run from Python in one call, the same run
the command line makes, and a second call that resumes it rather than training again."""

import json

import pytest
from conftest import CACHE, TINY, set_flags

from bridges import FeatureStore
from mister_jax.configs import get_config
from mister_jax.configs.overrides import apply_overrides

SCORES = ("test", "val", "best_epoch", "seeds", "epochs", "label_names", "train_shapes", "num_params", "config")


@pytest.fixture(scope="module")
def library_run(tmp_path_factory, tiny_features, compile_cache):
    from mister_jax import train_and_evaluate

    config = apply_overrides(get_config("demo"), TINY + ["epochs=2", "seeds=2"])
    workdir = tmp_path_factory.mktemp("library") / "run"
    lines = []
    results = train_and_evaluate(config, tiny_features / "demo", workdir, cache_dir=compile_cache, log=lines.append)
    return {"results": results, "workdir": workdir, "log": lines, "config": config, "features": tiny_features}


def test_one_call_trains_the_demo_store_and_returns_what_results_json_holds(library_run):
    results, workdir = library_run["results"], library_run["workdir"]
    written = json.loads((workdir / "results.json").read_text())
    assert results["test"]["weighted_f1"] == written["test"]["weighted_f1"]
    assert len(results["test"]["weighted_f1"]["per_seed"]) == 2 and results["epochs"] == 2
    assert results == written
    assert results["dataset"] == "demo"  # the store's folder name
    assert len((workdir / "metrics.jsonl").read_text().splitlines()) == 2 and (workdir / "report.md").exists()
    assert any("compiled 1 training shapes" in line for line in library_run["log"])


def test_the_library_run_is_the_command_line_run(library_run, tmp_path):
    from mister_jax.main import main

    out = tmp_path / "cli"
    assert (
        main(
            [
                "--dataset",
                "demo",
                "--features",
                str(library_run["features"]),
                "--out",
                str(out),
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
    cli = json.loads((out / "results.json").read_text())
    assert {k: cli[k] for k in SCORES} == {k: library_run["results"][k] for k in SCORES}


def test_calling_again_resumes_the_finished_run_to_the_same_results(library_run, compile_cache):
    from mister_jax import train_and_evaluate

    lines = []
    store = FeatureStore.open(library_run["features"] / "demo")  # a store object works as its path does
    again = train_and_evaluate(
        library_run["config"], store, library_run["workdir"], cache_dir=compile_cache, log=lines.append
    )
    assert f"resumed {library_run['workdir']} after epoch 2" in lines
    assert again == library_run["results"]


def test_restart_trains_from_scratch_to_the_same_scores(library_run, compile_cache, tmp_path):
    import shutil

    from mister_jax import train_and_evaluate

    workdir = tmp_path / "run"
    shutil.copytree(library_run["workdir"], workdir)
    lines = []
    again = train_and_evaluate(
        library_run["config"],
        library_run["features"] / "demo",
        workdir,
        restart=True,
        cache_dir=compile_cache,
        log=lines.append,
    )
    assert not any(line.startswith("resumed") for line in lines)
    assert {k: again[k] for k in SCORES} == {k: library_run["results"][k] for k in SCORES}
