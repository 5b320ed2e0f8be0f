"""python -m mister_jax.sweep: every combination of a grid as a normal run, skipped once complete."""

import json

import pytest
from conftest import CACHE, TINY, set_flags

from mister_jax import sweep


def test_grid_combinations_vary_the_last_key_fastest():
    grid = sweep.parse_grid(["lambda_con=0,1", "alpha_kl=0,0.1"])
    assert [sweep.run_name(c) for c in sweep.combinations(grid)] == [
        "lambda_con=0,alpha_kl=0",
        "lambda_con=0,alpha_kl=0.1",
        "lambda_con=1,alpha_kl=0",
        "lambda_con=1,alpha_kl=0.1",
    ]


@pytest.mark.parametrize(
    "grid, message", [("lambda_con", "expected key=value1,value2"), ("nope=1,2", "--set nope: unknown key")]
)
def test_a_bad_grid_is_one_line(tmp_path, tiny_features, capsys, grid, message):
    code = sweep.main(
        [
            "--dataset",
            "demo",
            "--features",
            str(tiny_features),
            "--out",
            str(tmp_path),
            "--grid",
            grid,
            "--quiet",
            "--jax-cache",
            CACHE,
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0]


def test_a_sweep_writes_a_run_per_value_and_skips_complete_runs(tmp_path, tiny_features, capsys):
    args = [
        "--dataset",
        "demo",
        "--features",
        str(tiny_features),
        "--out",
        str(tmp_path),
        "--epochs",
        "1",
        "--seeds",
        "1",
        "--grid",
        "lambda_con=0,1",
        "--quiet",
        "--jax-cache",
        CACHE,
        *set_flags(TINY),
    ]
    assert sweep.main(args) == 0
    for value in ("0", "1"):
        results = json.loads((tmp_path / f"lambda_con={value}" / "results.json").read_text())
        assert results["config"]["loss"]["lambda_con"] == float(value)
    table = (tmp_path / "sweep.md").read_text()
    assert "| lambda_con | val | test | test interval | run |" in table and "`lambda_con=1`" in table
    assert (tmp_path / "sweep_lambda_con.png").stat().st_size > 0
    capsys.readouterr()
    assert sweep.main(args) == 0
    assert capsys.readouterr().err.count("complete, skipped") == 2
