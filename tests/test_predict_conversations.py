"""scripts/predict_conversations.sh: raw conversations (text, audio, some rows without text) to emotions
through the run's own adapters, checked against `mister_jax.predict` on the store it wrote, and the
provenance refusal of an adapter the run's features did not come from.

The world is built once: tiny text and speech models, their adapters fine-tuned for one epoch on a
small labelled custom corpus, a tiny MiSTER-E run trained on that store, a tiny Whisper, and one run of
the script on three new conversations.
"""

import importlib.util
import json
import subprocess
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, train_args
from matplotlib.image import imread

from encoders_torch import extract
from mister_jax import main as train_main
from mister_jax import predict, provenance

torch.set_num_threads(1)
SCRIPT = REPO / "scripts" / "predict_conversations.sh"
WORDS = {"calm": "okay fine then", "cross": "furious angry mad"}
TONE = {"calm": 220.0, "cross": 660.0}


def _fixture(name):
    spec = importlib.util.spec_from_file_location(f"fixture_{name}", Path(__file__).parent / "fixtures" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_wav(path, frequency, seed):
    t = np.arange(8_000) / 16_000
    noise = 0.05 * np.random.default_rng(seed).standard_normal(t.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(16_000)
        f.writeframes((np.clip(0.5 * np.sin(2 * np.pi * frequency * t) + noise, -1, 1) * 32767).astype("<i2").tobytes())


def write_corpus(path, rows):
    """Rows of (conversation, utterance, label or None, split or None, text given); a clip for each."""
    lines = []
    for i, (conversation, utterance, label, split, text) in enumerate(rows):
        tone = label or ("cross" if i % 2 else "calm")
        write_wav(path.parent / "clips" / f"{utterance}.wav", TONE[tone], i)
        row = {"conversation_id": conversation, "utterance_id": utterance, "speaker": "AB"[i % 2]}
        row.update({"audio": f"clips/{utterance}.wav"}, **({"text": WORDS[tone]} if text else {}))
        row.update({"label": label} if label else {}, **({"split": split} if split else {}))
        lines.append(json.dumps(row))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def labelled_rows():
    labels = ["calm", "cross", "calm", "cross", "cross", "calm"]
    rows = []
    for split, n in (("train", 4), ("val", 2), ("test", 2)):
        for c in range(n):
            rows += [(f"{split}{c}", f"{split}{c}_{k}", labels[(c + k) % 6], split, True) for k in range(3)]
    return rows


NEW = [  # three conversations, ids with gaps; some rows lack text (the ASR fills them); one labelled row
    ("call 7", "u1", None, None, True),
    ("call 7", "u5", "cross", None, False),
    ("call 7", "u9", None, None, True),
    ("call/8", "v1", None, None, False),
    ("call/8", "v2", None, None, True),
    ("c9", "w1", None, None, True),
    ("c9", "w2", None, None, True),
    ("c9", "w3", None, None, False),
    ("c9", "w4", None, None, True),
]


def _extract(data, model, out, modality, *extra):
    argv = ["--dataset", "custom", "--data-root", str(data), "--modality", modality, "--model", str(model)]
    argv += ["--out", str(out), "--epochs", "1", "--batch-size", "4", "--embedding-dim", "8", "--device", "cpu"]
    assert extract.main([*argv, "--lr", "1e-3", *extra]) == 0


def script(conversations, out, *flags):
    return subprocess.run(
        ["bash", str(SCRIPT), str(conversations), "--out", str(out), "--device", "cpu", *map(str, flags)],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("conversations")
    tiny = _fixture("tiny_models")
    vocabulary = list(WORDS.values())
    models = {
        "text": tiny.tiny_llama(root / "llama", vocabulary),
        "speech": tiny.tiny_qwen2_audio(root / "qwen", vocabulary),
    }
    labelled = write_corpus(root / "labelled" / "talks.jsonl", labelled_rows())
    for modality, model in models.items():
        _extract(labelled, model, root / "features", modality)
    _extract(labelled, models["text"], root / "other", "text", "--seed", "1")
    adapters = {m: root / "features" / "custom" / "adapters" / m for m in models}
    run = root / "run"
    assert train_main.main(train_args(root / "features", run, 2, seeds=1, dataset="custom")) == 0
    whisper = _fixture("tiny_whisper").tiny_whisper(root / "whisper")
    conversations = write_corpus(root / "new" / "calls.jsonl", NEW)
    out = root / "out"
    flags = ["--run", run, "--text-adapter", adapters["text"], "--speech-adapter", adapters["speech"], "--asr", whisper]
    done = script(conversations, out, *flags)
    assert done.returncode == 0, done.stderr
    return {
        "root": root,
        "models": models,
        "adapters": adapters,
        "other": root / "other" / "custom" / "adapters" / "text",
        "run": run,
        "conversations": conversations,
        "out": out,
    }


def test_the_scripts_predictions_are_those_of_mister_jax_predict_on_its_store(world, tmp_path):
    reference = tmp_path / "reference.jsonl"
    argv = ["--run", str(world["run"]), "--dataset", "custom", "--features", str(world["out"] / "features")]
    assert predict.main([*argv, "--split", "test", "--out", str(reference)]) == 0
    lines = (world["out"] / "predictions.jsonl").read_text()
    assert lines == reference.read_text()
    rows = [json.loads(line) for line in lines.splitlines()]
    assert [(r["conversation_id"], r["utterance_id"]) for r in rows] == [(c, u) for c, u, *_ in NEW]
    assert [r["label"] for r in rows] == [label for _, _, label, _, _ in NEW]
    assert all(len(r["gate"]) == 3 and abs(sum(r["gate"]) - 1) < 1e-5 for r in rows)


def test_every_conversation_gets_a_timeline_figure(world):
    figures = world["out"] / "timelines"
    assert sorted(p.name for p in figures.iterdir()) == ["c9.png", "call_7.png", "call_8.png"]
    assert all(imread(figures / name).ndim == 3 for name in ("c9.png", "call_7.png", "call_8.png"))


def test_utterances_without_text_are_transcribed_before_the_text_encoder(world):
    records = [json.loads(line) for line in (world["out"] / "transcripts.jsonl").read_text().splitlines()]
    assert [(r["utterance_id"], r["from"]) for r in records] == [(u, "file" if t else "asr") for _, u, _, _, t in NEW]
    assert all(r["text"].strip() for r in records)
    given = {u: WORDS[label or ("cross" if i % 2 else "calm")] for i, (_, u, label, _, t) in enumerate(NEW) if t}
    assert {r["utterance_id"]: r["text"] for r in records if r["from"] == "file"} == given
    manifest = json.loads((world["out"] / "features" / "custom" / "manifest.json").read_text())
    assert manifest["modalities"]["text"]["source"]["data_root"] == str(
        (world["out"] / "conversations.jsonl").resolve()
    )


def test_the_run_records_the_adapters_and_models_its_features_came_from(world):
    recorded = json.loads((world["run"] / "provenance.json").read_text())["modalities"]
    store = json.loads((world["root"] / "features" / "custom" / "manifest.json").read_text())["modalities"]
    assert recorded == store
    for modality in ("text", "speech"):
        source = recorded[modality]["source"]
        assert source["adapter"] == str(world["adapters"][modality].resolve())
        assert source["model"] == str(world["models"][modality].resolve())
        assert source["adapter_digest"] == provenance.adapter_digest(world["adapters"][modality])
        assert source["model_digest"] == provenance.model_digest(world["models"][modality])


def test_a_different_adapter_is_refused_in_one_line_before_anything_is_extracted(world, tmp_path):
    out = tmp_path / "out"
    flags = ["--run", world["run"], "--text-adapter", world["other"], "--speech-adapter", world["adapters"]["speech"]]
    done = script(world["conversations"], out, *flags)
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert len(lines) == 1
    digest = provenance.adapter_digest(world["other"])
    assert lines[0].startswith(
        f"error: --text-adapter {world['other']}: digest {digest}, but the run's text features came from "
        f"adapter {world['adapters']['text'].resolve()}"
    )
    assert lines[0].endswith("or pass --allow-mismatch to predict anyway")
    assert not out.exists()


def test_a_model_other_than_the_runs_is_refused_naming_the_flag(world, tmp_path, capsys):
    argv = ["--run", str(world["run"]), "--text-model", str(world["models"]["speech"]), "--args-out", str(tmp_path)]
    assert provenance.main(argv) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(
        f"error: --text-model {world['models']['speech']}: config and tokenizer differ from those of "
        f"{world['models']['text'].resolve()}, the run's text model"
    )
    assert not list(tmp_path.iterdir())


def test_a_run_without_provenance_json_is_checked_against_its_stores_manifest(world, tmp_path):
    run = tmp_path / "old-run"
    run.mkdir()
    (run / "run_config.json").write_text((world["run"] / "run_config.json").read_text())
    assert provenance.main(["--run", str(run), "--args-out", str(tmp_path / "args")]) == 0
    text = (tmp_path / "args" / "text.args").read_text().split("\0")
    model, adapter = world["models"]["text"].resolve(), world["adapters"]["text"].resolve()
    assert text == ["--modality", "text", "--model", str(model), "--adapter", str(adapter), "--dtype", "float32"] + [
        "--max-length",
        "128",  # extract's defaults, with which the run's text features were made
        "--template",
        "{text}",
        "",
    ]


def test_features_that_no_adapter_made_are_refused_even_with_allow_mismatch(tmp_path, capsys):
    source = {"generator": "bridges.demo", "seed": 0}
    record = {"store": "features/demo", "modalities": {"text": {"dim": 6, "dtype": "float32", "source": source}}}
    (tmp_path / "provenance.json").write_text(json.dumps(record))
    assert provenance.main(["--run", str(tmp_path), "--allow-mismatch", "--args-out", str(tmp_path / "args")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: {tmp_path / 'provenance.json'}: the run's text features were not written by encoders_torch.extract "
        "(their source "
        'is {"generator": "bridges.demo", "seed": 0}), so no adapter encodes like them — train the run on a store '
        "that encoders_torch.extract wrote"
    ]


def test_a_text_only_run_encodes_text_alone_and_says_a_speech_adapter_goes_unused(world, tmp_path, capsys):
    record = json.loads((world["run"] / "provenance.json").read_text())
    record["modalities"].pop("speech")
    (tmp_path / "provenance.json").write_text(json.dumps(record))
    argv = [
        "--run",
        str(tmp_path),
        "--speech-adapter",
        str(world["adapters"]["speech"]),
        "--args-out",
        str(tmp_path / "a"),
    ]
    assert provenance.main(argv) == 0
    assert capsys.readouterr().err.splitlines() == [
        "warning: --speech-adapter: the run uses no speech features, so it is not used"
    ]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["text.args"]


def test_allow_mismatch_warns_and_encodes_with_the_adapter_given(world, tmp_path, capsys):
    argv = ["--run", str(world["run"]), "--text-adapter", str(world["other"]), "--allow-mismatch"]
    assert provenance.main([*argv, "--args-out", str(tmp_path)]) == 0
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"warning: --text-adapter {world['other']}: digest ")
    text = (tmp_path / "text.args").read_text().split("\0")
    assert text[text.index("--adapter") + 1] == str(world["other"])
