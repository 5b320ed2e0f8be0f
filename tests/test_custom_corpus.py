"""`--dataset custom`: one JSONL or CSV file of conversations, its orders, labels, splits, and one line per bad row."""

import csv
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from bridges import FeatureStore
from encoders_torch import extract
from encoders_torch.corpora import CorpusError, read_corpus
from encoders_torch.custom_corpus import FIELDS, read_custom, relabel

torch.set_num_threads(1)


def row(conversation, utterance, **fields):
    """A row with every required field; `fields` overrides or adds (None removes a field)."""
    out = {
        "conversation_id": conversation,
        "utterance_id": utterance,
        "speaker": "A",
        "text": f"words of {utterance}",
        "audio": f"clips/{utterance}.wav",
    }
    out.update(fields)
    return {k: v for k, v in out.items() if v is not None}


def write_jsonl(folder, rows, header=None, clips=True, name="talk.jsonl"):
    """Writes rows (and an optional header line) as JSONL, and an empty clip for every audio path."""
    path = Path(folder) / name
    lines = ([json.dumps(header)] if header is not None else []) + [json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    if clips:
        for r in rows:
            if r.get("audio"):
                (path.parent / r["audio"]).parent.mkdir(parents=True, exist_ok=True)
                (path.parent / r["audio"]).write_bytes(b"")
    return path


def write_csv(folder, rows, name="talk.csv"):
    path = Path(folder) / name
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, FIELDS, restval="")
        writer.writeheader()
        writer.writerows(rows)
    for r in rows:
        (path.parent / r["audio"]).parent.mkdir(parents=True, exist_ok=True)
        (path.parent / r["audio"]).write_bytes(b"")
    return path


FULL = [
    row("d1", "d1_u1", speaker="Ann", label="happy", split="train", start=0.0),
    row("d1", "d1_u2", speaker="Bob", label="sad", split="train", start=1.5),
    row("d2", "d2_u1", speaker="Ann", label="neutral", split="val", start=0.0),
    row("d2", "d2_u2", speaker="Bob", label="happy", split="val", start=2.0),
    row("d3", "d3_u1", speaker="Cy", label="sad", split="test", start=0.5),
]


def problems(path, **kwargs):
    """The lines of the CorpusError reading `path` raises."""
    with pytest.raises(CorpusError) as caught:
        read_custom(path, **kwargs)
    return str(caught.value).splitlines()


def shape(corpus):
    """split -> [(conversation, [(utterance, speaker, transcript, audio, label name or None)])]."""
    name = lambda i: None if i < 0 else corpus.label_names[i]
    return {
        split: [(c.id, [(u.id, u.speaker, u.transcript, u.audio, name(u.label)) for u in c.utterances]) for c in convs]
        for split, convs in corpus.splits.items()
    }


# ------------------------------------------------------------------------------------ every field


def test_jsonl_with_every_field_reads_ids_speakers_texts_audio_labels_and_splits(tmp_path):
    path = write_jsonl(tmp_path, FULL)
    corpus = read_custom(path, require=("text", "audio"))
    assert corpus.name == "custom" and corpus.dropped == {}
    assert corpus.label_names == ("happy", "neutral", "sad")
    assert shape(corpus) == {
        "train": [
            (
                "d1",
                [
                    ("d1_u1", "Ann", "words of d1_u1", tmp_path / "clips" / "d1_u1.wav", "happy"),
                    ("d1_u2", "Bob", "words of d1_u2", tmp_path / "clips" / "d1_u2.wav", "sad"),
                ],
            )
        ],
        "val": [
            (
                "d2",
                [
                    ("d2_u1", "Ann", "words of d2_u1", tmp_path / "clips" / "d2_u1.wav", "neutral"),
                    ("d2_u2", "Bob", "words of d2_u2", tmp_path / "clips" / "d2_u2.wav", "happy"),
                ],
            )
        ],
        "test": [("d3", [("d3_u1", "Cy", "words of d3_u1", tmp_path / "clips" / "d3_u1.wav", "sad")])],
    }


def test_csv_with_every_field_reads_as_the_same_jsonl(tmp_path):
    (tmp_path / "j").mkdir()
    (tmp_path / "c").mkdir()
    from_jsonl = read_custom(write_jsonl(tmp_path / "j", FULL), require=("text", "audio"))
    from_csv = read_custom(write_csv(tmp_path / "c", FULL), require=("text", "audio"))
    relative = lambda corpus, root: {
        s: [(c, [(*u[:3], u[3].relative_to(root), u[4]) for u in us]) for c, us in convs]
        for s, convs in shape(corpus).items()
    }
    assert from_csv.label_names == from_jsonl.label_names
    assert relative(from_csv, tmp_path / "c") == relative(from_jsonl, tmp_path / "j")


def test_read_corpus_dispatches_custom_to_the_file_reader(tmp_path):
    path = write_jsonl(tmp_path, FULL)
    assert read_corpus("custom", path, ("text",)) == read_custom(path)


def test_header_fixes_the_label_names_and_their_order_including_unused_classes(tmp_path):
    header = {"label_names": ["sad", "happy", "neutral", "angry"]}
    corpus = read_custom(write_jsonl(tmp_path, FULL, header))
    assert corpus.label_names == ("sad", "happy", "neutral", "angry")
    assert [u.label for u in corpus.utterances("train")] == [1, 0]


def test_without_a_header_label_names_are_the_sorted_labels_present(tmp_path):
    rows = [row("d", "u1", label="zest"), row("d", "u2", label="anger"), row("d", "u3", label="zest")]
    corpus = read_custom(write_jsonl(tmp_path, rows))
    assert corpus.label_names == ("anger", "zest")
    assert [u.label for u in corpus.utterances("test")] == [1, 0, 1]


# ---------------------------------------------------------------------------------------- ordering


def test_gaps_in_utterance_ids_keep_the_file_order(tmp_path):
    rows = [row("d", 10), row("d", 3), row("d", 7), row("e", 0)]  # numbers, with gaps, out of numeric order
    corpus = read_custom(write_jsonl(tmp_path, rows))
    assert [[u.id for u in c.utterances] for c in corpus.splits["test"]] == [["10", "3", "7"], ["0"]]


def test_start_times_order_a_conversation_whose_rows_are_interleaved(tmp_path):
    rows = [
        row("d", "late", start=9.5),
        row("e", "e1", start="0"),
        row("d", "early", start=0.25),
        row("e", "e2", start="1e1"),
        row("d", "middle_a", start="3"),
        row("d", "middle_b", start=3),
    ]
    corpus = read_custom(write_jsonl(tmp_path, rows))
    assert [(c.id, [u.id for u in c.utterances]) for c in corpus.splits["test"]] == [
        ("d", ["early", "middle_a", "middle_b", "late"]),
        ("e", ["e1", "e2"]),
    ]


# ------------------------------------------------------------------------- labels, splits, modalities


def test_unlabelled_rows_are_minus_one_and_rows_without_split_are_test(tmp_path):
    rows = [row("d", "u1", label="joy", split="train"), row("d", "u2", label="", split="train")]
    rows += [row("e", "u3", label="calm", split=""), row("e", "u4")]
    corpus = read_custom(write_jsonl(tmp_path, rows))
    assert [u.label for u in corpus.utterances("train")] == [1, -1]
    assert [u.label for u in corpus.utterances("test")] == [0, -1]
    assert corpus.splits["val"] == ()


def test_a_file_without_labels_has_no_label_names_and_every_utterance_in_test(tmp_path):
    corpus = read_custom(write_jsonl(tmp_path, [row("d", "u1"), row("d", "u2")]))
    assert corpus.label_names == ()
    assert corpus.counts("test") == (2, 1) and corpus.counts("train") == (0, 0)


def test_text_only_needs_no_audio_field_and_speech_needs_no_text(tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "s").mkdir()
    text_only = write_jsonl(tmp_path / "t", [row("d", "u1", audio=None)])
    assert read_custom(text_only, require=("text",)).utterances("test")[0].audio is None
    speech_only = write_jsonl(tmp_path / "s", [row("d", "u1", text=None)])
    assert read_custom(speech_only, require=("audio",)).utterances("test")[0].transcript is None


def test_relabel_moves_class_indices_onto_an_adapters_label_names(tmp_path):
    rows = [row("d", "u1", label="sad"), row("d", "u2"), row("d", "u3", label="happy")]
    corpus = relabel(read_custom(write_jsonl(tmp_path, rows)), ["neutral", "happy", "sad"])
    assert corpus.label_names == ("neutral", "happy", "sad")
    assert [u.label for u in corpus.utterances("test")] == [2, -1, 1]
    assert relabel(corpus, ["happy", "other"]) is corpus  # "sad" is not among them: unchanged


# ------------------------------------------------------------------------------ missing audio / text


def test_missing_audio_fails_with_one_line_per_row(tmp_path):
    path = write_jsonl(tmp_path, FULL)
    (tmp_path / "clips" / "d1_u2.wav").unlink()
    (tmp_path / "clips" / "d3_u1.wav").unlink()
    lines = problems(path, require=("audio",))
    assert len(lines) == 2
    assert lines[0].startswith(f"{path}:2: audio 'clips/d1_u2.wav' is not a file ({tmp_path / 'clips' / 'd1_u2.wav'})")
    assert lines[1].startswith(f"{path}:5: audio 'clips/d3_u1.wav' is not a file")
    assert all(line.endswith("— fix the path, or pass --on-missing skip to drop the utterance") for line in lines)


def test_missing_audio_is_skipped_and_counted_and_an_emptied_conversation_goes(tmp_path):
    path = write_jsonl(tmp_path, FULL)
    (tmp_path / "clips" / "d1_u2.wav").unlink()
    (tmp_path / "clips" / "d3_u1.wav").unlink()
    corpus = read_custom(path, require=("audio",), on_missing="skip")
    assert corpus.dropped == {"no audio file": 2}
    assert [u.id for u in corpus.utterances("train")] == ["d1_u1"]
    assert corpus.splits["test"] == ()


def test_missing_audio_is_not_checked_for_text(tmp_path):
    path = write_jsonl(tmp_path, FULL, clips=False)
    assert read_custom(path, require=("text",)).counts("train") == (2, 1)


def test_empty_audio_path_follows_on_missing(tmp_path):
    path = write_jsonl(tmp_path, [row("d", "u1"), row("d", "u2", audio="")])
    assert problems(path, require=("audio",)) == [
        f"{path}:2: empty audio — give the path of the clip, or pass --on-missing skip to drop the utterance"
    ]
    assert read_custom(path, require=("audio",), on_missing="skip").dropped == {"no audio file": 1}


def test_empty_text_fails_with_its_line_or_is_skipped(tmp_path):
    path = write_jsonl(tmp_path, [row("d", "u1", text="  "), row("d", "u2"), row("d", "u3", text=None)])
    assert problems(path) == [
        f"{path}:1: empty text — write the transcript, or pass --on-missing skip to drop the utterance",
        f"{path}:3: missing required field 'text' — give this row a non-empty 'text'",
    ]
    skipped = write_jsonl(tmp_path, [row("d", "u1", text=""), row("d", "u2")], name="skip.jsonl")
    corpus = read_custom(skipped, on_missing="skip")
    assert corpus.dropped == {"no transcript": 1} and [u.id for u in corpus.utterances("test")] == ["u2"]


def test_a_label_outside_the_header_follows_on_missing(tmp_path):
    path = write_jsonl(
        tmp_path, [row("d", "u1", label="joy"), row("d", "u2", label="glee")], {"label_names": ["joy", "calm"]}
    )
    assert problems(path) == [
        f"{path}:3: label 'glee' is not in the header's label_names — fix it or add it, "
        "or pass --on-missing skip to drop the utterance"
    ]
    assert read_custom(path, on_missing="skip").dropped == {"unknown label": 1}


# ---------------------------------------------------------------------------------------- bad rows

BAD_ROWS = {
    "missing required field": (
        [row("d", "u1"), row("d", "u2", speaker=None, utterance_id="")],
        2,
        "missing required fields 'utterance_id', 'speaker' — give this row a non-empty 'utterance_id', 'speaker'",
    ),
    "unknown split": (
        [row("d", "u1", split="dev")],
        1,
        "split 'dev' is unknown — use train, val or test (empty means test)",
    ),
    "non-numeric start": (
        [row("d", "u1", start="0:01")],
        1,
        "start '0:01' is not a number — write a time such as 12.5, or leave it empty",
    ),
    "duplicate utterance_id": (
        [row("d", "u1"), row("e", "u2"), row("e", "u1")],
        3,
        "utterance_id 'u1' is already on line 1 — give every utterance its own id",
    ),
    "interleaved without start": (
        [row("d", "u1"), row("e", "u2"), row("d", "u3")],
        3,
        "conversation 'd' continues here after rows of 'e' (from line 2) and has no start times to order by — "
        "keep each conversation's rows together in dialogue order, or give them a start",
    ),
    "start on some rows only": (
        [row("d", "u1", start=1), row("d", "u2")],
        2,
        "no start, but conversation 'd' has one on line 1 — give every row of 'd' a start, or none",
    ),
    "conversation in two splits": (
        [row("d", "u1", split="train"), row("d", "u2", split="val")],
        2,
        "split 'val', but conversation 'd' is in 'train' on line 1 — give all rows of a conversation one split",
    ),
    "field of the wrong type": (
        [row("d", "u1", speaker=["A", "B"])],
        1,
        "speaker is a JSON list — write it as a string",
    ),
}


@pytest.mark.parametrize("case", BAD_ROWS)
def test_a_bad_row_is_one_line_naming_the_file_the_line_and_the_fix(tmp_path, case):
    rows, line, message = BAD_ROWS[case]
    path = write_jsonl(tmp_path, rows)
    assert problems(path) == [f"{path}:{line}: {message}"]


def test_a_line_that_is_not_a_json_object_is_named(tmp_path):
    path = tmp_path / "talk.jsonl"
    path.write_text(json.dumps(row("d", "u1")) + "\n\n{oops\n[1, 2]\n")
    assert problems(path) == [
        f"{path}:3: not JSON (Expecting property name enclosed in double quotes, column 2) — "
        "write one JSON object per line",
        f"{path}:4: a JSON list, not an object — write one object per line",
    ]


def test_a_header_after_the_first_line_or_without_two_classes_is_named(tmp_path):
    late = write_jsonl(tmp_path, [row("d", "u1"), {"label_names": ["a", "b"]}], name="late.jsonl")
    assert problems(late) == [f"{late}:2: a label_names header after the first line — move it to the first line"]
    single = write_jsonl(tmp_path, [row("d", "u1")], {"label_names": ["a", "a"]}, name="single.jsonl")
    assert problems(single) == [
        f'{single}:1: label_names must list two or more distinct class names, such as {{"label_names": '
        '["neutral", "happy"]}'
    ]


def test_csv_without_a_required_column_is_named_on_line_one(tmp_path):
    path = tmp_path / "talk.csv"
    path.write_text("conversation_id,utterance_id,text\nd,u1,hello\n")
    assert problems(path) == [
        f"{path}:1: no column 'speaker' — the first line must name the columns {', '.join(FIELDS)}"
    ]


def test_csv_row_with_another_number_of_fields_is_named_with_its_first_line(tmp_path):
    path = tmp_path / "talk.csv"
    path.write_text('conversation_id,utterance_id,speaker,text\nd,u1,A,"two\nlines"\nd,u2,A,hello, world\n')
    assert problems(path) == [
        f"{path}:4: 5 fields, the first line names 4 — put quotes around fields that hold commas or line breaks"
    ]


def test_every_problem_of_a_file_is_reported_together_in_line_order(tmp_path):
    rows = [row("d", "u1", split="dev"), row("d", "u2", text=""), row("e", "u1"), row("d", "u4", start="x")]
    lines = problems(write_jsonl(tmp_path, rows))
    assert [line.split(":")[1] for line in lines] == ["1", "2", "3", "4"]
    assert ["split 'dev'" in lines[0], "empty text" in lines[1], "already on line" in lines[2]] == [True] * 3


def test_a_path_that_is_not_a_jsonl_or_csv_file_is_one_line(tmp_path):
    with pytest.raises(CorpusError, match=r"not a file — for --dataset custom pass your \.jsonl or \.csv file"):
        read_custom(tmp_path)
    (tmp_path / "talk.txt").write_text("")
    with pytest.raises(CorpusError, match=r"name a \.jsonl or \.csv file"):
        read_custom(tmp_path / "talk.txt")


# ------------------------------------------------------------------------------------------ extract


def _argv(data, model, out, *extra):
    return ["--dataset", "custom", "--data-root", str(data), "--modality", "text", "--model", str(model)] + [
        "--out",
        str(out),
        "--epochs",
        "1",
        "--batch-size",
        "2",
        "--embedding-dim",
        "8",
        "--chunk-size",
        "4",
        *extra,
    ]


def test_extract_exits_2_with_one_line_per_bad_row(tmp_path, capsys):
    path = write_jsonl(tmp_path, [row("d", "u1", split="dev"), row("d", "u1")])
    assert extract.main(_argv(path, tmp_path, tmp_path / "out")) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: {path}:1: split 'dev' is unknown — use train, val or test (empty means test)",
        f"{path}:2: utterance_id 'u1' is already on line 1 — give every utterance its own id",
    ]


def test_extract_refuses_to_fine_tune_without_labelled_train_and_val(tmp_path, capsys):
    path = write_jsonl(tmp_path, [row("d", "u1", label="a"), row("d", "u2", label="b")])
    assert extract.main(_argv(path, tmp_path, tmp_path / "out")) == 2
    assert "no labelled utterance in split train or val to fine-tune on" in capsys.readouterr().err


def test_extract_refuses_to_fine_tune_on_a_single_class(tmp_path, capsys):
    rows = [row("d", "u1", label="joy", split="train"), row("e", "u2", label="joy", split="val")]
    assert extract.main(_argv(write_jsonl(tmp_path, rows), tmp_path, tmp_path / "out")) == 2
    assert "labels name 1 class ('joy'); fine-tuning needs two or more" in capsys.readouterr().err


def _tiny_llama(folder, words):
    spec = importlib.util.spec_from_file_location("tiny_models", Path(__file__).parent / "fixtures" / "tiny_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.tiny_llama(folder, words)


def test_extract_trains_on_a_custom_file_and_embeds_an_unlabelled_one_with_its_adapter(tmp_path):
    labels = ["calm", "glad", "calm", "cross", "glad", "calm"]
    train = [row(f"t{i // 3}", f"t{i}", label=label, split="train") for i, label in enumerate(labels)]
    val = [row("v", "v1", label="glad", split="val"), row("v", "v2", split="val")]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    labelled = write_jsonl(tmp_path / "a", train + val + [row("x", "x1", label="cross")])
    model = _tiny_llama(tmp_path / "tiny-llama", [r["text"] for r in train + val] + ["words of y1 y2"])
    assert extract.main(_argv(labelled, model, tmp_path / "out_a")) == 0
    trained = FeatureStore.open(tmp_path / "out_a" / "custom")
    assert trained.label_names == ["calm", "cross", "glad"]
    assert list(trained.split("val").labels) == [2, -1]
    assert trained.modalities["text"]["source"]["head_weighted_f1"]["val"] is not None

    unlabelled = write_jsonl(tmp_path / "b", [row("y", "y1"), row("y", "y2", label="glad")])
    adapter = tmp_path / "out_a" / "custom" / "adapters" / "text"
    assert extract.main(_argv(unlabelled, model, tmp_path / "out_b", "--adapter", str(adapter))) == 0
    store = FeatureStore.open(tmp_path / "out_b" / "custom")
    assert store.label_names == ["calm", "cross", "glad"] and store.manifest["splits"] == ["test"]
    assert list(store.split("test").utterance_ids) == ["y1", "y2"]
    assert list(store.split("test").labels) == [-1, 2]
    assert store.split("test").features("text").shape == (2, 8)
