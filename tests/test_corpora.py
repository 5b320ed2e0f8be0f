"""Corpus readers: release formats, dialogue order, the paper's splits, and clear failures on missing data."""

import collections
import csv
import importlib.util
import json
from pathlib import Path

import pytest

from encoders_torch.corpora import CorpusError, read_corpus

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"real public data folder {DATA} is absent")


def _fixture(name):
    spec = importlib.util.spec_from_file_location(f"fixture_{name}", Path(__file__).parent / "fixtures" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


iemocap = _fixture("iemocap")


@pytest.fixture
def iemocap_root(tmp_path):
    return iemocap.write_iemocap(tmp_path / "IEMOCAP_full_release")


# ------------------------------------------------------------------------------------------ IEMOCAP


def test_iemocap_counts_and_session_splits(iemocap_root):
    corpus = read_corpus("iemocap", iemocap_root, require=("text", "audio"))
    assert {s: corpus.counts(s) for s in corpus.splits} == iemocap.COUNTS
    sessions = {s: {int(u.id[3:5]) for u in corpus.utterances(s)} for s in corpus.splits}
    assert sessions == {"train": {2, 3, 4}, "val": {1}, "test": {5}}


def test_iemocap_orders_turns_by_start_time_and_drops_excluded_codes(iemocap_root):
    corpus = read_corpus("iemocap", iemocap_root)
    conversation = corpus.splits["val"][1]
    expected = [t for t, code, _ in sorted(iemocap.TURNS, key=lambda x: x[2]) if code in iemocap.KEPT_CODES]
    assert conversation.id == "Ses01M_script01_1"
    assert [u.id.rsplit("_", 1)[1] for u in conversation.utterances] == expected
    assert [u.speaker for u in conversation.utterances] == [t[0] for t in expected]


def test_iemocap_labels_transcripts_and_audio_paths(iemocap_root):
    corpus = read_corpus("iemocap", iemocap_root)
    codes = dict((t, c) for t, c, _ in iemocap.TURNS)
    names = {"ang": "angry", "hap": "happy", "sad": "sad", "neu": "neutral", "exc": "excited", "fru": "frustrated"}
    for u in corpus.utterances("test"):
        code = codes[u.id.rsplit("_", 1)[1]]
        assert corpus.label_names[u.label] == names[code]
        assert u.transcript.startswith(iemocap.WORDS[code])
        assert u.audio == iemocap_root / "Session5" / "sentences" / "wav" / u.id.rsplit("_", 1)[0] / f"{u.id}.wav"


def test_missing_audio_fails_with_counts_or_is_skipped(iemocap_root):
    victims = sorted((iemocap_root / "Session2" / "sentences" / "wav").rglob("*.wav"))[:3]
    for path in victims:
        path.unlink()
    with pytest.raises(CorpusError, match=r"3 with no audio file.*--on-missing skip"):
        read_corpus("iemocap", iemocap_root, require=("audio",))
    corpus = read_corpus("iemocap", iemocap_root, require=("audio",), on_missing="skip")
    assert corpus.dropped == {"no audio file": 3}
    assert corpus.counts("train")[0] == iemocap.COUNTS["train"][0] - 3
    assert read_corpus("iemocap", iemocap_root, require=("text",)).counts("train") == iemocap.COUNTS["train"]


def test_unknown_label_and_missing_transcript_are_counted(iemocap_root):
    evaluation = iemocap_root / "Session3" / "dialog" / "EmoEvaluation" / "Ses03F_impro01.txt"
    evaluation.write_text(evaluation.read_text().replace("\tneu\t", "\tzzz\t"))
    transcript = iemocap_root / "Session4" / "dialog" / "transcriptions" / "Ses04F_impro01.txt"
    transcript.write_text("".join(line for line in transcript.read_text().splitlines(True) if "_M000 " not in line))
    with pytest.raises(CorpusError, match=r"1 with unknown label.*'zzz'.*1 with no transcript"):
        read_corpus("iemocap", iemocap_root)
    corpus = read_corpus("iemocap", iemocap_root, on_missing="skip")
    assert corpus.dropped == {"unknown label": 1, "no transcript": 1}


def test_wrong_root_names_the_flag(tmp_path):
    with pytest.raises(CorpusError, match="--data-root"):
        read_corpus("iemocap", tmp_path)


# ------------------------------------------------------------------------------------ real public data


@needs_data
def test_meld_counts_and_utterance_order_with_gaps():
    corpus = read_corpus("meld", DATA / "meld")
    assert [corpus.counts(s) for s in ("train", "val", "test")] == [(9989, 1038), (1109, 114), (2610, 280)]
    labels = collections.Counter(corpus.label_names[u.label] for u in corpus.utterances("train"))
    assert labels == {
        "neutral": 4710,
        "joy": 1743,
        "surprise": 1205,
        "anger": 1109,
        "sadness": 683,
        "disgust": 271,
        "fear": 268,
    }
    with open(DATA / "meld" / "train_sent_emo.csv", encoding="utf-8", newline="") as f:
        ids = collections.defaultdict(list)
        for row in csv.DictReader(f):
            ids[f"dia{row['Dialogue_ID']}"].append(int(row["Utterance_ID"]))
    gapped = [c for c in corpus.splits["train"] if sorted(ids[c.id]) != list(range(len(ids[c.id])))]
    assert len(gapped) == 72
    for c in gapped:
        assert [u.id for u in c.utterances] == [f"{c.id}_utt{n}" for n in sorted(ids[c.id])]
    assert "dia60" not in {c.id for c in corpus.splits["train"]}


@needs_data
def test_meld_audio_paths_follow_the_release_naming():
    corpus = read_corpus("meld", DATA / "meld")
    first = {s: corpus.splits[s][0].utterances[0].audio for s in ("train", "val", "test")}
    assert first["train"] == DATA / "meld" / "train_splits" / "dia0_utt0.mp4"
    assert first["val"].parent.name == "dev_splits_complete"
    assert first["test"].parent.name == "output_repeated_splits_test"
    with pytest.raises(CorpusError, match=r"13708 with no audio file"):
        read_corpus("meld", DATA / "meld", require=("audio",))


@needs_data
def test_emorynlp_counts_scenes_and_labels():
    corpus = read_corpus("emorynlp", DATA / "emorynlp")
    assert [corpus.counts(s) for s in ("train", "val", "test")] == [(7551, 659), (954, 89), (984, 79)]
    assert {corpus.label_names[u.label] for u in corpus.utterances("train")} == set(corpus.label_names)
    assert corpus.splits["train"][0].utterances[0].speaker == "Monica Geller"
    with pytest.raises(CorpusError, match="text only"):
        read_corpus("emorynlp", DATA / "emorynlp", require=("audio",))


@needs_data
def test_mosi_counts_and_paper_split():
    with open(DATA / "mosi" / "OpinionLevelSentiment.csv", encoding="utf-8") as f:
        scores = [float(row[4]) for row in csv.reader(f)]
    assert (sum(s > 0 for s in scores), sum(s < 0 for s in scores), sum(s == 0 for s in scores)) == (1080, 1023, 96)
    corpus = read_corpus("mosi", DATA / "mosi", require=())
    assert sum(corpus.counts(s)[0] for s in corpus.splits) == 2199
    assert [len(corpus.splits[s]) for s in ("train", "val", "test")] == [49, 13, 31]
    labels = collections.Counter(u.label for s in corpus.splits for u in corpus.utterances(s))
    assert labels == {1: 1080 + 96, 0: 1023}
    folds = json.loads((DATA / "mosi" / "sdk_folds.json").read_text())
    assert {c.id for c in corpus.splits["test"]} == set(folds["test"])
    videos = [c.id for s in ("train", "val", "test") for c in corpus.splits[s]]
    assert videos == sorted(videos)


@needs_data
def test_mosi_sdk_folds_and_missing_transcripts():
    corpus = read_corpus("mosi", DATA / "mosi", require=(), mosi_split="sdk")
    assert [len(corpus.splits[s]) for s in ("train", "val", "test")] == [52, 10, 31]
    with pytest.raises(CorpusError, match=r"2199 with no transcript"):
        read_corpus("mosi", DATA / "mosi", require=("text",))


def test_mosi_reads_release_transcripts_and_audio(tmp_path):
    videos = [f"vid{i:02d}" for i in range(93)]
    rows = [f"{s}.0,{s + 1}.0,{v},{s + 1},{(-1) ** s * 0.5 if s else 0}" for v in videos for s in range(2)]
    (tmp_path / "Labels").mkdir()
    (tmp_path / "Labels" / "OpinionLevelSentiment.csv").write_text("\n".join(rows) + "\n")
    transcripts = tmp_path / "Transcript" / "Segmented"
    transcripts.mkdir(parents=True)
    for v in videos:
        (transcripts / f"{v}.annotprocessed").write_text(f"2_DELIM_second of {v}\n1_DELIM_first of {v}\n")
    iemocap.write_wav(tmp_path / "Audio" / "WAV_16000" / "Segmented" / "vid92_2.wav", 0.2, 300.0, 0)
    corpus = read_corpus("mosi", tmp_path, require=("text",))
    last = corpus.splits["test"][-1]
    assert [(u.id, u.transcript, u.label) for u in last.utterances] == [
        ("vid92_1", "first of vid92", 1),
        ("vid92_2", "second of vid92", 0),
    ]
    assert last.utterances[1].audio.name == "vid92_2.wav"
    with pytest.raises(CorpusError, match=r"185 with no audio file"):
        read_corpus("mosi", tmp_path, require=("audio",))
