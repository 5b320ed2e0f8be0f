"""Streaming a causal run (#22): `mister_jax.stream`'s step, one utterance at a time, equals the batch
causal model; `python -m mister_jax.predict --stream` prints each prediction as its utterance arrives,
from stdin or the store, and refuses a bidirectional run and bad lines in one line each."""

import dataclasses
import functools
import io
import json
import os
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest
from conftest import CACHE, REPO, TINY_DEMO, cli, tiny_config, tiny_store

from mister_jax import atomic
from mister_jax import predict as predict_cli
from mister_jax.checkpoint import RunCheckpoints
from mister_jax.config import ModelConfig
from mister_jax.input_pipeline import Batch
from mister_jax.params import init_params
from mister_jax.steps import predict_step
from mister_jax.stream import ensure_capacity, init_state, jitted_stream_step

TINY = dict(
    speech_dim=12,
    text_dim=10,
    num_classes=3,
    can_hidden=8,
    gru_layers=2,
    fusion_dim=16,
    fusion_layers=2,
    attention_dim=8,
    attention_heads=2,
)
LENGTH = 7


@pytest.mark.parametrize(
    "variant, gate, capacity",
    [("mister-e", "fc", 4), ("feat-moe", "mlp", 128), ("monolithic", "fc", 128), ("text-only", "fc", 128)],
)
def test_streamed_predictions_equal_the_batch_causal_predictions(variant, gate, capacity):
    # mister-e's key/value buffer holds 4 utterances of 7: the stream grows it on the way.
    cfg = ModelConfig(variant=variant, gate=gate, causal=True, **TINY)
    params = init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(1)
    speech, text = (rng.normal(size=(1, LENGTH, d)).astype(np.float32) for d in (cfg.speech_dim, cfg.text_dim))
    batch = Batch(speech, text, np.zeros((1, LENGTH), np.int32), np.ones((1, LENGTH), bool))
    expected = jax.device_get(jax.jit(functools.partial(predict_step, model_cfg=cfg))(params, batch))
    step, state, streamed = jitted_stream_step(cfg), init_state(cfg, capacity), []
    for t in range(LENGTH):
        state, prediction = step(params, ensure_capacity(state, t + 1), {"speech": speech[0, t], "text": text[0, t]})
        streamed.append(jax.device_get(prediction))
    assert set(streamed[0]) == set(expected)
    for name, probs in expected.items():
        np.testing.assert_allclose(np.stack([p[name] for p in streamed]), probs[0], atol=1e-6, err_msg=name)


def test_a_bidirectional_configuration_has_no_stream():
    with pytest.raises(ValueError, match="--set causal=true"):
        init_state(ModelConfig(**TINY))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A store and two run directories on it with the same random parameters, causal and bidirectional
    (as `python -m mister_jax.import_torch` writes a run: run_config.json and one seed's best)."""
    root = tmp_path_factory.mktemp("stream")
    store = tiny_store(root / "features", dataclasses.replace(TINY_DEMO, conversations=(("train", 2), ("test", 3))))
    names = json.loads((store / "manifest.json").read_text())["label_names"]
    for name, causal in (("causal", "true"), ("bidirectional", "false")):
        config = tiny_config(1, f"causal={causal}", "speech_dim=5", "text_dim=6", seeds=1)
        out = root / name
        out.mkdir()
        sections = {s: dataclasses.asdict(getattr(config, s)) for s in ("model", "loss", "train")}
        atomic.write_json(out / "run_config.json", {"dataset": "demo", "label_names": names, **sections})
        if causal == "true":
            ckpt = RunCheckpoints(out / "checkpoints")
            ckpt.save_best(0, 0, init_params(config.model, jax.random.key(0)))
            ckpt.close()
    return root


def _predict(monkeypatch, capsys, *args: str, stdin: str = ""):
    """``python -m mister_jax.predict ARGS`` in this process with ``stdin``: (exit code, stdout's JSON
    lines, stderr)."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = predict_cli.main(["--jax-cache", CACHE, *args])
    captured = capsys.readouterr()
    return code, [json.loads(line) for line in captured.out.splitlines()], captured.err


def _store_args(runs):
    return ["--dataset", "demo", "--features", str(runs / "features")]


def test_streaming_the_store_gives_the_batch_predictions_line_for_line(runs, monkeypatch, capsys):
    code, streamed, _ = _predict(monkeypatch, capsys, "--stream", "--run", str(runs / "causal"), *_store_args(runs))
    assert code == 0
    out = runs / "batch.jsonl"
    assert predict_cli.main(["--run", str(runs / "causal"), *_store_args(runs), "--out", str(out)]) == 0
    batch = [json.loads(line) for line in out.read_text().splitlines()]
    ids = lambda rows: [(r["conversation_id"], r["utterance_id"], r["label"], r["prediction"]) for r in rows]
    assert ids(streamed) == ids(batch)
    for key in ("probs", "gate"):
        np.testing.assert_allclose([r[key] for r in streamed], [r[key] for r in batch], atol=1e-6)
    for expert in ("speech", "text", "multimodal"):
        got, want = ([r["experts"][expert] for r in rows] for rows in (streamed, batch))
        np.testing.assert_allclose(got, want, atol=1e-6)


def _jsonl_of_the_store(runs) -> list[str]:
    """The test split as stdin lines, its conversations interleaved utterance by utterance, each ended
    by an "end" line."""
    from bridges import FeatureStore

    split = FeatureStore.open(runs / "features" / "demo").split("test")
    names = FeatureStore.open(runs / "features" / "demo").label_names
    rows = {}
    for i, c in enumerate(split.conversation_ids):
        rows.setdefault(str(c), []).append(i)
    lines = []
    for step in range(max(map(len, rows.values())) + 1):
        for conversation, members in rows.items():
            if step == len(members):
                lines.append(json.dumps({"conversation_id": conversation, "end": True}))
            elif step < len(members):
                i = members[step]
                line = {"conversation_id": conversation, "utterance_id": str(split.utterance_ids[i]), "speaker": "A"}
                line |= {m: np.asarray(split.features(m)[i]).tolist() for m in ("speech", "text")}
                lines.append(json.dumps(line | {"label": names[split.labels[i]]}))
    return lines


def test_interleaved_conversations_on_stdin_give_the_store_predictions(runs, monkeypatch, capsys):
    lines = _jsonl_of_the_store(runs)
    code, from_stdin, _ = _predict(
        monkeypatch, capsys, "--stream", "--run", str(runs / "causal"), stdin="\n".join(lines) + "\n"
    )
    _, from_store, _ = _predict(monkeypatch, capsys, "--stream", "--run", str(runs / "causal"), *_store_args(runs))
    assert code == 0 and len(from_stdin) == len(from_store)
    assert [r["utterance_id"] for r in from_stdin] == [json.loads(l)["utterance_id"] for l in lines if "end" not in l]
    by_id = {r["utterance_id"]: r for r in from_store}
    for r in from_stdin:
        assert r["label"] == by_id[r["utterance_id"]]["label"]
        np.testing.assert_allclose(r["probs"], by_id[r["utterance_id"]]["probs"], atol=1e-6)


def test_a_bidirectional_run_is_refused_in_one_line(runs, monkeypatch, capsys):
    code, out, err = _predict(monkeypatch, capsys, "--stream", "--run", str(runs / "bidirectional"))
    assert code == 2 and not out and err.count("\n") == 1
    assert "causal=false" in err and "--set causal=true" in err and "Traceback" not in err


GOOD = {"conversation_id": "c", "utterance_id": "u0", "speech": [0.0] * 5, "text": [0.0] * 6}


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "<stdin>:2: not JSON"),
        (json.dumps({"utterance_id": "u"}), '<stdin>:2: no "conversation_id"'),
        (
            json.dumps(GOOD | {"speech": [1, 2]}),
            '<stdin>:2: "speech" must be a list of 5 numbers (the run\'s speech_dim), got shape [2]',
        ),
        (json.dumps(GOOD | {"text": [0, 0, 0, 0, 0, float("nan")]}), '<stdin>:2: "text" holds NaN or infinite values'),
        (json.dumps(GOOD | {"label": "bored"}), "<stdin>:2: label 'bored' is not one of the run's classes"),
    ],
)
def test_a_bad_line_stops_the_stream_with_one_line_naming_it(runs, monkeypatch, capsys, line, message):
    stdin = f"{json.dumps(GOOD)}\n{line}\n"
    code, out, err = _predict(monkeypatch, capsys, "--stream", "--run", str(runs / "causal"), stdin=stdin)
    assert code == 2 and len(out) == 1 and out[0]["utterance_id"] == "u0"  # the good line's prediction stands
    assert err.count("\n") == 1 and err.startswith(f"error: {message}"), err


def test_stream_and_out_together_are_refused(runs, monkeypatch, capsys):
    code, _, err = _predict(monkeypatch, capsys, "--stream", "--run", str(runs / "causal"), "--out", "x.jsonl")
    assert code == 2 and "redirect it" in err


def test_each_prediction_is_printed_before_the_next_utterance_is_sent(runs):
    # One line in, one prediction out, while stdin stays open: nothing waits for the end of the input.
    proc = subprocess.Popen(
        cli(["--stream", "--run", str(runs / "causal"), "--jax-cache", CACHE], "mister_jax.predict"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=dict(os.environ),
    )
    utterance = lambda i: json.dumps(
        {"conversation_id": "c", "utterance_id": f"u{i}", "speech": [i] * 5, "text": [1] * 6}
    )
    replies = []
    try:
        for i in range(2):
            proc.stdin.write(utterance(i) + "\n")
            proc.stdin.flush()
            reader = threading.Thread(target=lambda: replies.append(proc.stdout.readline()))
            reader.start()
            reader.join(timeout=120)
            assert not reader.is_alive(), "no prediction printed while stdin stays open"
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
    finally:
        proc.kill()
    assert [json.loads(r)["utterance_id"] for r in replies] == ["u0", "u1"]
