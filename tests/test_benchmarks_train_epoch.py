"""Smoke run of benchmarks/train_epoch.py at toy sizes, every variant, so that it cannot rot (its own
file: the longest smoke run, which the parallel test runner can then give a worker of its own)."""

import json

from conftest import run_benchmark


def test_train_epoch_smoke_runs_every_variant_and_writes_the_figures(tmp_path):
    out = tmp_path / "train_epoch.json"
    proc = run_benchmark(
        "train_epoch.py",
        "--dims",
        "tiny",
        "--epochs",
        "1",
        "--variants",
        "a,b,c,f",
        "--skip-cold",
        "--threads",
        "1",
        "--out",
        str(out),
    )
    result = json.loads(out.read_text())
    assert set(result["median"]) == {"a", "b", "c-vmap", "c-int", "f"}
    for tag in ("a", "b", "c-vmap", "c-int", "f"):
        assert result["median"][tag]["real_utterances_per_s"] > 0
        assert result["median"][tag]["peak_rss_mib"] > 0
    assert result["median"]["b"]["num_shapes"] >= 1
    assert all(r[t]["loss_finite"] for r in result["rounds"] for t in ("b", "c-vmap", "c-int", "f"))
    assert "b_over_a_real_utt_per_s" in result["ratios"] and "c-vmap_time_over_3b" in result["ratios"]
    assert "f_bfloat16_over_b_real_utt_per_s" in result["ratios"]
    assert "ratio b_over_a_real_utt_per_s" in proc.stdout and "target " in proc.stdout
