"""Smoke runs of the benchmark scripts at toy sizes, so that they cannot rot, and checks of the pieces
the benchmark's fairness rests on (same data for both sides, padding-invariant PyTorch reference)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402
from conftest import run_benchmark  # noqa: E402


def test_paper_lengths_are_iemocap_shaped_and_waste_about_39_percent_when_padded_to_batch_max():
    lengths = common.conversation_lengths(common.PAPER)
    assert len(lengths) == 92 and lengths.sum() == 4791
    assert lengths.min() >= 24 and lengths.max() <= 110
    rng = np.random.default_rng(0)
    padded = np.mean([common.padded_utterances(common.authors_batches(lengths, 8, rng), lengths) for _ in range(50)])
    assert 0.35 < 1 - lengths.sum() / padded < 0.43


def test_pad_batch_places_each_conversation_at_the_start_of_its_row():
    corpus = common.make_corpus(common.TINY)
    speech, text, labels, mask = common.pad_batch(corpus, np.array([2, 0]), width=10)
    for row, c in enumerate((2, 0)):
        n, s = corpus.lengths[c], corpus.starts[c]
        np.testing.assert_array_equal(speech[row, :n], corpus.speech[s : s + n])
        np.testing.assert_array_equal(labels[row, :n], corpus.labels[s : s + n])
        assert mask[row].sum() == n and not speech[row, n:].any() and not text[row, n:].any()


def test_torch_reference_is_our_model_plus_the_attention_projections_it_composes():
    pytest.importorskip("torch")
    pytest.importorskip("jax")
    import dataclasses

    from torch_reference import AttentionMoE
    from train_epoch import iemocap_config

    from mister_jax.params import count_params, param_shapes

    dims = common.TINY
    ours = count_params(param_shapes(dataclasses.replace(iemocap_config(dims, "float32", None).model, gate="mlp")))
    a = dims.attention_dim
    in_out = 4 * dims.fusion_layers * (3 * a * a + 3 * a + a * a + a)  # nn.MultiheadAttention in/out projections
    assert sum(p.numel() for p in AttentionMoE(dims).parameters()) == ours + in_out


def test_protocol_smoke_times_the_training_cli_and_extrapolates_to_100_epochs(tmp_path):
    out = tmp_path / "protocol.json"
    # In bfloat16, so that the training CLI is run end to end with it as well.
    proc = run_benchmark("protocol.py", "--dims", "tiny", "--epochs", "1", "--set", "dtype=bfloat16", "--out", str(out))
    result = json.loads(out.read_text())
    assert result["overrides"] == ["dtype=bfloat16"]
    epochs = result["run_1_epoch_cold_s"] + 99 * result["epoch_s"]
    assert result["protocol_hours"] == pytest.approx(
        (epochs + (result["checkpoints_written"] - 1) * result["checkpoint_s"]) / 3600
    )
    assert result["checkpoint_s"] == pytest.approx(result["epoch_with_checkpoint_s"] - result["epoch_s"])
    assert result["protocol_hours_checkpoint_every_epoch"] == pytest.approx(
        (result["run_1_epoch_cold_s"] + 99 * result["epoch_with_checkpoint_s"]) / 3600
    )
    assert 0 < result["epoch_training_s"] < result["epoch_s"] < result["run_1_epoch_cold_s"]
    assert result["epoch_with_checkpoint_copies_s"] > 0
    assert "protocol_hours: " in proc.stdout and "target protocol<=3h" in proc.stdout


def test_extract_smoke_times_sorted_by_tokens_by_chars_shuffled_and_single(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "extract.json"
    run_benchmark(
        "extract.py",
        "--size",
        "tiny",
        "--utterances",
        "12",
        "--batch-size",
        "4",
        "--embedding-dim",
        "16",
        "--threads",
        "1",
        "--out",
        str(out),
    )
    result = json.loads(out.read_text())
    assert set(result["passes"]) == {"sorted", "by-chars", "shuffled", "single"}
    assert result["passes"]["single"]["token_padding_efficiency"] == 1.0
    efficiency = {name: p["token_padding_efficiency"] for name, p in result["passes"].items()}
    assert efficiency["sorted"] >= efficiency["by-chars"] and efficiency["sorted"] >= efficiency["shuffled"]


def test_gru_formulations_of_the_profile_compute_what_the_project_gru_computes():
    jax = pytest.importorskip("jax")
    import levers

    from mister_jax.ops.gru import BidirectionalGRU

    streams, layers, width, hidden = 2, 2, 6, 3
    rng = np.random.default_rng(0)
    x = rng.standard_normal((streams, 3, 9, width)).astype(np.float32)
    mask = np.arange(9)[None] < np.array([7, 5, 2])[:, None]  # T = 9 > the longest conversation
    params = levers.init_gru(jax.random.key(0), streams, layers, width, hidden)
    # The same weights in mister_jax.ops.gru's layout: streams g = 2 m + d.
    ours = {
        f"{name}_{l}": np.asarray(p[key]).reshape((2 * streams,) + p[key].shape[2:])
        for l, p in enumerate(params)
        for name, key in (("w_ih", "wi"), ("b_ih", "bi"), ("w_hh", "wh"), ("b_hh", "bh"))
    }
    expected = np.asarray(jax.jit(BidirectionalGRU(hidden, layers).apply)({"params": ours}, x, mask))
    for name in ("naive", "hoisted", "fused"):
        got = np.asarray(jax.jit(getattr(levers, name))(params, x, mask))
        np.testing.assert_allclose(got[:, mask], expected[:, mask], rtol=1e-5, atol=1e-5, err_msg=name)


def test_finetune_smoke_times_every_lever_side_by_side(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "finetune.json"
    run_benchmark(
        "finetune.py",
        "--quick",
        "--utterances",
        "8",
        "--clips",
        "4",
        "--rounds",
        "1",
        "--batch-size",
        "4",
        "--embedding-dim",
        "16",
        "--threads",
        "1",
        "--out",
        str(out),
    )
    result = json.loads(out.read_text())
    text = result["text"]["llama-tiny"]
    assert set(text["ratios"]) == {f"{v}_over_bucketed" for v in ("shuffled", "bf16", "ckpt", "eager")}
    figures = text["rounds"][0]
    assert figures["shuffled"]["padding_efficiency"] <= figures["bucketed"]["padding_efficiency"] <= 1.0
    assert all(np.isfinite(f["loss"]) for f in figures.values())
    assert result["speech"]["ratios"]["cached_over_uncached"]["median"] > 0


def test_streaming_smoke_times_the_stream_and_the_recomputed_prefixes_and_they_agree(tmp_path):
    out = tmp_path / "streaming.json"
    proc = run_benchmark(
        "streaming.py", "--dims", "tiny", "--utterances", "6", "--warmup", "2", "--pad-multiple", "4", "--out", str(out)
    )
    result = json.loads(out.read_text())
    for name in ("stream", "recompute_prefix"):
        assert 0 < result[name]["median_ms"] <= result[name]["p95_ms"]
    assert result["recompute_over_stream_median"] > 0
    assert result["max_abs_probability_difference"] < 1e-5  # the same causal model, two ways
    assert "ratio recompute/stream" in proc.stdout
