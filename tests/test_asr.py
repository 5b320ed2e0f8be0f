"""`python -m encoders_torch.asr`: Whisper transcripts for the utterances without text, the given text left alone."""

import importlib.util
import json
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import WhisperForConditionalGeneration, WhisperProcessor

from encoders_torch import asr
from encoders_torch.custom_corpus import read_custom, write_custom

torch.set_num_threads(1)


def _fixture(name):
    spec = importlib.util.spec_from_file_location(f"fixture_{name}", Path(__file__).parent / "fixtures" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tiny_whisper = _fixture("tiny_whisper")


def write_wav(path, seconds, frequency):
    t = np.arange(int(seconds * 16_000)) / 16_000
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(16_000)
        f.writeframes((0.5 * np.sin(2 * np.pi * frequency * t) * 32767).astype("<i2").tobytes())


@pytest.fixture(scope="module")
def whisper_dir(tmp_path_factory):
    return tiny_whisper.tiny_whisper(tmp_path_factory.mktemp("asr") / "tiny-whisper")


def reference(model_dir, wave_):
    """transformers' own Whisper generate + decode on one clip (no batching, no windows)."""
    processor = WhisperProcessor.from_pretrained(model_dir)
    model = WhisperForConditionalGeneration.from_pretrained(model_dir).eval()
    features = processor.feature_extractor([wave_], sampling_rate=16_000, return_tensors="pt")["input_features"]
    with torch.no_grad():
        return processor.batch_decode(model.generate(features), skip_special_tokens=True)[0].strip()


def load(path):
    with wave.open(str(path), "rb") as f:
        return np.frombuffer(f.readframes(f.getnframes()), "<i2").astype(np.float32) / 32768.0


ROWS = [
    {"conversation_id": "c1", "utterance_id": "a", "speaker": "Ann", "audio": "clips/a.wav", "label": "calm"},
    {"conversation_id": "c1", "utterance_id": "b", "speaker": "Bob", "text": "my own words", "audio": "clips/b.wav"},
    {"conversation_id": "c2", "utterance_id": "c", "speaker": "Ann", "text": "  ", "audio": "clips/c.wav"},
]


def corpus_file(folder):
    for i, r in enumerate(ROWS):
        write_wav(folder / r["audio"], 0.6, 220.0 * (i + 1))
    path = folder / "talk.jsonl"
    lines = [json.dumps({"label_names": ["calm", "cross"]})] + [json.dumps(r) for r in ROWS]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_asr_fills_the_text_of_rows_without_it_and_leaves_given_text_alone(tmp_path, whisper_dir):
    path = corpus_file(tmp_path / "in")
    out = tmp_path / "out" / "filled.jsonl"
    assert asr.main([str(path), "--model", str(whisper_dir), "--out", str(out), "--device", "cpu"]) == 0
    heard = {u: reference(whisper_dir, load(tmp_path / "in" / "clips" / f"{u}.wav")) for u in ("a", "c")}
    assert all(heard.values())
    filled = read_custom(out, require=("text", "audio"))
    assert [(u.id, u.transcript) for u in filled.utterances("test")] == [
        ("a", heard["a"]),
        ("b", "my own words"),
        ("c", heard["c"]),
    ]
    records = [json.loads(line) for line in (out.parent / "transcripts.jsonl").read_text().splitlines()]
    assert [(r["utterance_id"], r["text"], r["from"]) for r in records] == [
        ("a", heard["a"], "asr"),
        ("b", "my own words", "file"),
        ("c", heard["c"], "asr"),
    ]
    record = json.loads((out.parent / "asr.json").read_text())
    assert (record["model"], record["transcribed"], record["given"]) == (str(whisper_dir.resolve()), 2, 1)


def test_a_clip_longer_than_the_window_is_transcribed_window_by_window(tmp_path, whisper_dir):
    window = tiny_whisper.WINDOW_SECONDS * 16_000
    rng = np.random.default_rng(0)
    clip = (0.3 * rng.standard_normal(int(2.5 * window))).astype(np.float32)
    pieces = [clip[:window], clip[window : 2 * window], clip[2 * window :]]
    expected = " ".join(reference(whisper_dir, p) for p in pieces)
    assert asr.Whisper(whisper_dir, "cpu").transcribe([clip], batch_size=2) == [expected]


def test_the_filled_file_reads_back_as_the_corpus_it_was_written_from(tmp_path):
    path = corpus_file(tmp_path)
    corpus = read_custom(path, require=("audio",))
    moved = tmp_path / "elsewhere" / "copy.jsonl"
    moved.parent.mkdir()
    assert read_custom(write_custom(corpus, moved), require=("audio",)) == corpus


def test_clips_in_which_whisper_hears_no_words_stop_it_with_one_line_each(tmp_path, capsys):
    path = corpus_file(tmp_path)
    deaf = tiny_whisper.tiny_whisper(tmp_path / "deaf-whisper", deaf=True)
    out = tmp_path / "filled.jsonl"
    assert asr.main([str(path), "--model", str(deaf), "--out", str(out), "--device", "cpu"]) == 2
    fix = "write its transcript in the file"
    assert capsys.readouterr().err.splitlines() == [
        f"error: {tmp_path / 'clips' / 'a.wav'}: Whisper heard no words in utterance 'a' — {fix}",
        f"{tmp_path / 'clips' / 'c.wav'}: Whisper heard no words in utterance 'c' — {fix}",
    ]
    assert not out.exists()


def test_rows_without_audio_are_named_before_any_model_loads(tmp_path, capsys):
    path = corpus_file(tmp_path)
    (tmp_path / "clips" / "a.wav").unlink()
    out = tmp_path / "filled.jsonl"
    assert asr.main([str(path), "--model", str(tmp_path / "no-model"), "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {path}:2: audio 'clips/a.wav' is not a file")
    assert not out.exists()


def test_a_folder_that_is_not_a_whisper_model_is_one_line(tmp_path, capsys):
    path = corpus_file(tmp_path)
    assert asr.main([str(path), "--model", str(tmp_path), "--out", str(tmp_path / "f.jsonl")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: ASR model {tmp_path}: cannot load a Whisper model")
