"""mister_jax.sharding: the seeds of a run split over devices. 1, 2 and 4 devices train the same seeds
(the same per-epoch losses and validation scores), a checkpoint written on 4 devices resumes on 1 to
the scores of the uninterrupted run, and device counts the rule cannot use are refused in one line.
(A CPU's devices split the seeds only, so these runs have 4 seeds; the batch axis is the rule's.)

The test process has one CPU device; the runs over several devices happen in one process of their
own with the CPU split into 4 (``--xla_force_host_platform_device_count=4``), which runs every command
of `_RUNS` in turn so that they share one start-up and the compile cache.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, train_args

from mister_jax.sharding import mesh_shape

EPOCHS, SEEDS = 3, 4
_SCRIPT = """
import json, sys
from mister_jax import main
codes = [main.main(args) for args in json.loads(sys.argv[1])]
print(json.dumps(codes))
"""


def _history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_features):
    """Four seeds of the tiny model on 1, 2 and 4 devices; a run stopped after 2 epochs on 4 devices and
    resumed on 1; two refused device settings. Every run vmaps the seeds, as several devices do."""
    root = tmp_path_factory.mktemp("devices")

    def run(name, epochs, *extra):
        return train_args(tiny_features, root / name, epochs, "--seed-mode", "vmap", *extra, seeds=SEEDS)

    commands = [
        run("d1", EPOCHS, "--devices", "1"),
        run("d2", EPOCHS, "--devices", "2"),
        run("d4", EPOCHS, "--devices", "4"),
        run("resumed", 2, "--devices", "4"),
        run("resumed", EPOCHS, "--devices", "1"),
        run("refused", EPOCHS, "--devices", "3"),
        train_args(tiny_features, root / "in-turn", EPOCHS, "--seed-mode", "sequential", "--devices", "2", seeds=SEEDS),
    ]
    env = {**os.environ, "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"}
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, json.dumps(commands)], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    codes = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"root": root, "codes": codes, "log": proc.stderr}


def test_the_mesh_gives_the_seed_axis_the_largest_divisor_of_the_seeds_and_the_batch_axis_the_rest():
    for devices in range(1, 13):
        for seeds in range(1, 7):
            for batch in (1, 4, 6, 8):
                seed = max(d for d in range(1, devices + 1) if devices % d == 0 and seeds % d == 0)
                expected = (seed, devices // seed) if batch % (devices // seed) == 0 else None
                assert mesh_shape(devices, seeds, batch) == expected
                cpu = expected if expected and expected[1] == 1 else None  # a CPU splits the seeds only
                assert mesh_shape(devices, seeds, batch, split_batches=False) == cpu
    assert mesh_shape(4, 2, 4) == (2, 2) and mesh_shape(2, 3, 8) == (1, 2) and mesh_shape(3, 2, 4) is None
    assert all(math.prod(mesh_shape(n, 2, 8)) == n for n in (1, 2, 4, 8))


def test_one_two_and_four_devices_train_the_same_losses_and_validation_scores(runs):
    assert runs["codes"][:3] == [0, 0, 0], runs["log"][-3000:]
    one = _history(runs["root"] / "d1")
    assert len(one) == EPOCHS and one[0]["train_loss"][0] != one[0]["train_loss"][1]  # the seeds differ
    for name in ("d2", "d4"):
        many = _history(runs["root"] / name)
        for a, b in zip(one, many):
            np.testing.assert_allclose(b["train_loss"], a["train_loss"], rtol=1e-5, atol=1e-5)
            for expert in a["val"]:
                np.testing.assert_allclose(b["val"][expert], a["val"][expert], atol=1e-5)
        test_one, test_many = _results(runs["root"] / "d1")["test"], _results(runs["root"] / name)["test"]
        np.testing.assert_allclose(test_many["weighted_f1"]["per_seed"], test_one["weighted_f1"]["per_seed"], atol=1e-5)


def test_the_devices_are_recorded_in_the_results_and_split_the_seeds(runs):
    meshes = {name: _results(runs["root"] / name)["devices"] for name in ("d1", "d2", "d4")}
    assert meshes["d1"] == {"devices": 1, "mesh": {"seed": 1, "batch": 1}, "processes": 1}
    assert meshes["d2"]["mesh"] == {"seed": 2, "batch": 1}
    assert meshes["d4"]["mesh"] == {"seed": 4, "batch": 1}
    assert "seeds [0, 1, 2, 3] vmapped in one step on a mesh of 4 devices {'seed': 4, 'batch': 1}" in runs["log"]


def test_a_checkpoint_written_on_four_devices_resumes_on_one_to_the_uninterrupted_scores(runs):
    assert runs["codes"][3:5] == [0, 0], runs["log"][-3000:]
    assert f"resumed {runs['root'] / 'resumed'} after epoch 2" in runs["log"]
    whole, resumed = _history(runs["root"] / "d4"), _history(runs["root"] / "resumed")
    assert len(resumed) == EPOCHS
    for a, b in zip(whole, resumed):
        np.testing.assert_allclose(b["train_loss"], a["train_loss"], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(b["val"]["moe"], a["val"]["moe"], atol=1e-5)
    r_whole, r_resumed = _results(runs["root"] / "d4"), _results(runs["root"] / "resumed")
    assert r_resumed["best_epoch"] == r_whole["best_epoch"]
    np.testing.assert_allclose(
        r_resumed["test"]["weighted_f1"]["per_seed"], r_whole["test"]["weighted_f1"]["per_seed"], atol=1e-5
    )
    assert r_resumed["devices"]["devices"] == 1


def test_device_counts_the_rule_cannot_use_are_refused_in_one_line(runs):
    assert runs["codes"][5:] == [2, 2]
    assert (
        "error: --devices 3: 4 seed(s) on 3 device(s) leave a batch axis of 3, but a CPU's devices split the "
        "seeds only (mister_jax.sharding) — choose --devices among 1, 2, 4, or another --seeds" in runs["log"]
    )
    assert (
        "error: --seed-mode sequential steps the seeds in turn on one device, not 2 — pass --devices 1" in runs["log"]
    )


def test_more_devices_than_the_process_has_is_one_line_naming_the_flag(tiny_features, tmp_path, capsys):
    from mister_jax import main

    assert main.main(train_args(tiny_features, tmp_path / "run", 1, "--devices", "8")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: --devices 8: this process has 1 cpu device(s) — pass --devices 1 or fewer (on a CPU, "
        "XLA_FLAGS=--xla_force_host_platform_device_count=N makes N devices)"
    ]
    assert not (tmp_path / "run").exists()
