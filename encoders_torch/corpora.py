"""Readers for the corpora in their own release formats, with the paper's splits (Sec. 4.1).

Every reader returns a `Corpus`: for each split (`train`, `val`, `test`) the conversations in a fixed
order, each a tuple of utterances in dialogue order. Utterances carry an id, speaker, transcript, audio
path and a label index into `Corpus.label_names`.

Readers check what the requested modalities need (`require`: "text" needs a transcript, "audio" an
existing audio file) and count every utterance that lacks it. `on_missing="fail"` raises a
`CorpusError` naming the counts and the fix; `on_missing="skip"` drops those utterances and records
the counts in `Corpus.dropped`. Labels that are neither in the task's classes nor in the corpus's known
codes are counted the same way.

Layouts (root = what the user passes as --data-root):

* IEMOCAP (`IEMOCAP_full_release`): `SessionN/dialog/EmoEvaluation/<dialog>.txt` summary lines
  `[start - end]<TAB>utterance_id<TAB>code<TAB>[v, a, d]`; `SessionN/dialog/transcriptions/<dialog>.txt`
  lines `utterance_id [start-end]: text`; `SessionN/sentences/wav/<dialog>/<utterance_id>.wav`.
  6-class task (angry, happy, sad, neutral, excited, frustrated); sessions 2–4 train, 1 val, 5 test;
  utterances ordered by start time.
* MELD: `{train,dev,test}_sent_emo.csv` (UTF-8), audio `dia{D}_utt{U}.mp4` (or `.wav`) in
  `train_splits/`, `dev_splits_complete/`, `output_repeated_splits_test/`; the official splits
  (`dev` becomes `val`); utterances ordered by `Utterance_ID` (it has gaps).
* CMU-MOSI: `OpinionLevelSentiment.csv` (no header: start, end, video_id, segment_no, score) anywhere
  under root; transcripts `<video>.annotprocessed` (`segment_DELIM_text` lines) and audio
  `<video>_<segment>.wav` anywhere under root. One video is one conversation (segments by number).
  Labels: negative `[-3, 0)`, positive `[0, 3]`. Split `"paper"`: videos sorted by id (Python string
  order); the first 49 train, the next 13 val, the last 31 test (these 31 are exactly the SDK's test
  fold). Split `"sdk"`: the folds of `sdk_folds.json` (`train`, `val`, `test` lists of video ids).
* EmoryNLP (text only): `emorynlp_{train,dev,test}_final.csv`; a conversation is one scene
  (Season, Episode, Scene_ID); utterances ordered by `Utterance_ID`.
* custom: root is one JSONL or CSV file of your own conversations, label names from the file
  (`encoders_torch.custom_corpus`).
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import json
import re
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Sequence

SPLITS = ("train", "val", "test")
DATASETS = ("iemocap", "meld", "mosi", "emorynlp", "custom")
LABEL_NAMES = {
    "iemocap": ("angry", "happy", "sad", "neutral", "excited", "frustrated"),
    "meld": ("neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger"),
    "mosi": ("negative", "positive"),
    "emorynlp": ("neutral", "joyful", "scared", "mad", "peaceful", "powerful", "sad"),
}
MODALITIES = ("text", "audio")

_IEMOCAP_CODES = {"ang": "angry", "hap": "happy", "sad": "sad", "neu": "neutral", "exc": "excited", "fru": "frustrated"}
_IEMOCAP_OTHER_CODES = {"sur", "fea", "dis", "oth", "xxx"}
_IEMOCAP_SPLIT_OF_SESSION = {1: "val", 2: "train", 3: "train", 4: "train", 5: "test"}
_IEMOCAP_SUMMARY = re.compile(r"^\[(\d+(?:\.\d+)?) - (\d+(?:\.\d+)?)\]\t(\S+)\t(\S+)\t\[")
_IEMOCAP_TRANSCRIPT = re.compile(r"^(\S+) \[[\d.]+-[\d.]+\]:\s?(.*)$")
_MELD_FILES = {"train": "train_sent_emo.csv", "val": "dev_sent_emo.csv", "test": "test_sent_emo.csv"}
_MELD_AUDIO_DIRS = {"train": "train_splits", "val": "dev_splits_complete", "test": "output_repeated_splits_test"}
_EMORYNLP_FILES = {
    "train": "emorynlp_train_final.csv",
    "val": "emorynlp_dev_final.csv",
    "test": "emorynlp_test_final.csv",
}
_MOSI_PAPER_SPLIT = (49, 13, 31)


class CorpusError(Exception):
    """A corpus that cannot be read as asked; the message is one line naming the file or flag and the fix."""


@dataclasses.dataclass(frozen=True)
class Utterance:
    id: str
    speaker: str
    transcript: str | None
    audio: Path | None
    label: int  # index into Corpus.label_names


@dataclasses.dataclass(frozen=True)
class Conversation:
    id: str
    utterances: tuple[Utterance, ...]

    def __len__(self) -> int:
        return len(self.utterances)


@dataclasses.dataclass(frozen=True)
class Corpus:
    name: str
    label_names: tuple[str, ...]
    splits: dict[str, tuple[Conversation, ...]]
    dropped: dict[str, int]  # reason -> utterances dropped with on_missing="skip"

    def utterances(self, split: str) -> list[Utterance]:
        return [u for c in self.splits[split] for u in c.utterances]

    def counts(self, split: str) -> tuple[int, int]:
        """(utterances, conversations) of a split."""
        return sum(len(c) for c in self.splits[split]), len(self.splits[split])


# ------------------------------------------------------------------------------------ validation


@dataclasses.dataclass
class _Draft:
    """An utterance before validation; `label` is a class name, or a raw code for unknown labels."""

    id: str
    speaker: str
    transcript: str | None
    audio: Path | None
    label: str
    example_audio: str = ""


def _finish(
    name: str,
    drafts: dict[str, list[tuple[str, list[_Draft]]]],
    require: Sequence[str],
    on_missing: str,
    where: str,
    unknown_ok: Callable[[str], bool] = lambda label: False,
) -> Corpus:
    """Checks drafts against `require` and the label set, then fails or drops as `on_missing` says.

    `unknown_ok(label)` marks labels the task excludes on purpose (e.g. IEMOCAP's `xxx`): those are
    dropped silently and are not an error.
    """
    if on_missing not in ("fail", "skip"):
        raise CorpusError(f"--on-missing {on_missing!r}: choose 'fail' or 'skip'")
    label_names = LABEL_NAMES[name]
    problems: Counter[str] = Counter()
    examples: dict[str, str] = {}

    def problem_of(d: _Draft) -> str | None:
        if d.label not in label_names:
            return f"unknown label {d.label!r}"
        if "text" in require and not (d.transcript and d.transcript.strip()):
            return "no transcript"
        if "audio" in require and (d.audio is None or not d.audio.is_file()):
            return "no audio file"
        return None

    splits: dict[str, tuple[Conversation, ...]] = {}
    for split in SPLITS:
        conversations = []
        for conv_id, items in drafts.get(split, []):
            kept = []
            for d in items:
                if d.label not in label_names and unknown_ok(d.label):
                    continue
                issue = problem_of(d)
                if issue is None:
                    kept.append(Utterance(d.id, d.speaker, d.transcript, d.audio, label_names.index(d.label)))
                    continue
                key = issue if not issue.startswith("unknown") else "unknown label"
                problems[key] += 1
                examples.setdefault(key, f"{d.id}" + (f" ({d.audio})" if key == "no audio file" else f" ({issue})"))
            if kept:
                conversations.append(Conversation(conv_id, tuple(kept)))
        splits[split] = tuple(conversations)
    if problems and on_missing == "fail":
        summary = "; ".join(f"{n} with {key}, e.g. {examples[key]}" for key, n in problems.items())
        raise CorpusError(
            f"{name} at {where}: {summary} — fix the data, or pass --on-missing skip to drop those utterances"
        )
    for split in SPLITS:
        if not splits[split]:
            raise CorpusError(f"{name} at {where}: split '{split}' has no usable utterances — check --data-root")
    return Corpus(name, label_names, splits, dict(problems))


def _check_root(root: Path, name: str, expect: str) -> None:
    if not root.is_dir():
        raise CorpusError(f"--data-root {root}: not a directory — point it at the {name} release ({expect})")


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise CorpusError(f"{path}: missing — point --data-root at the folder holding {path.name}")
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------------------- IEMOCAP


def read_iemocap(root: str | Path, require: Sequence[str] = ("text",), on_missing: str = "fail") -> Corpus:
    """IEMOCAP_full_release, 6-class task: sessions 2–4 train, 1 val, 5 test (Sec. 4.1)."""
    root = Path(root)
    _check_root(root, "IEMOCAP", "the folder holding Session1 … Session5")
    sessions = [root / f"Session{s}" for s in range(1, 6)]
    absent = [s.name for s in sessions if not (s / "dialog" / "EmoEvaluation").is_dir()]
    if absent:
        raise CorpusError(
            f"--data-root {root}: {', '.join(absent)}/dialog/EmoEvaluation missing — point it at IEMOCAP_full_release"
        )
    drafts: dict[str, list[tuple[str, list[_Draft]]]] = {s: [] for s in SPLITS}
    for session_dir in sessions:
        for evaluation in sorted((session_dir / "dialog" / "EmoEvaluation").glob("*.txt")):
            dialog = evaluation.stem
            timed = []
            for line in evaluation.read_text(encoding="utf-8", errors="replace").splitlines():
                m = _IEMOCAP_SUMMARY.match(line)
                if m:
                    timed.append((float(m.group(1)), m.group(3), m.group(4)))
            if not timed:
                continue
            transcripts = _iemocap_transcripts(session_dir / "dialog" / "transcriptions" / f"{dialog}.txt")
            items = []
            for _, utt_id, code in sorted(timed):
                conv_id = utt_id.rsplit("_", 1)[0]
                session = int(utt_id[3:5])
                items.append(
                    _Draft(
                        id=utt_id,
                        speaker=utt_id.rsplit("_", 1)[1][0],
                        transcript=transcripts.get(utt_id),
                        audio=session_dir / "sentences" / "wav" / conv_id / f"{utt_id}.wav",
                        label=_IEMOCAP_CODES.get(code, code),
                    )
                )
            split = _IEMOCAP_SPLIT_OF_SESSION[session]
            drafts[split].append((dialog, items))
    return _finish("iemocap", drafts, require, on_missing, str(root), lambda code: code in _IEMOCAP_OTHER_CODES)


def _iemocap_transcripts(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    out = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        m = _IEMOCAP_TRANSCRIPT.match(line.strip())
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


# ------------------------------------------------------------------------------------------ MELD


def read_meld(root: str | Path, require: Sequence[str] = ("text",), on_missing: str = "fail") -> Corpus:
    """MELD official train / dev / test (dev is our `val`), 7 emotions."""
    root = Path(root)
    _check_root(root, "MELD", "the folder holding train_sent_emo.csv")
    drafts: dict[str, list[tuple[str, list[_Draft]]]] = {}
    for split, filename in _MELD_FILES.items():
        dialogues: dict[int, list[tuple[int, _Draft]]] = {}
        audio_dir = root / _MELD_AUDIO_DIRS[split]
        for row in _read_csv(root / filename):
            d, u = int(row["Dialogue_ID"]), int(row["Utterance_ID"])
            utt_id = f"dia{d}_utt{u}"
            dialogues.setdefault(d, []).append(
                (
                    u,
                    _Draft(
                        id=utt_id,
                        speaker=row["Speaker"],
                        transcript=row["Utterance"],
                        audio=_meld_audio(audio_dir, utt_id),
                        label=row["Emotion"].strip().lower(),
                    ),
                )
            )
        drafts[split] = [
            (f"dia{d}", [draft for _, draft in sorted(items, key=lambda x: x[0])])
            for d, items in sorted(dialogues.items())
        ]
    return _finish("meld", drafts, require, on_missing, str(root))


def _meld_audio(audio_dir: Path, utt_id: str) -> Path:
    """`dia{D}_utt{U}.wav` when the user converted the clips, else the released `.mp4`."""
    wav = audio_dir / f"{utt_id}.wav"
    return wav if wav.is_file() else audio_dir / f"{utt_id}.mp4"


# ------------------------------------------------------------------------------------------ MOSI


def read_mosi(
    root: str | Path,
    require: Sequence[str] = ("text",),
    on_missing: str = "fail",
    split: str = "paper",
    folds: str | Path | None = None,
) -> Corpus:
    """CMU-MOSI, 2 classes. `split="paper"`: sorted videos 49 / 13 / 31; `split="sdk"`: `sdk_folds.json`."""
    root = Path(root)
    _check_root(root, "CMU-MOSI", "the folder holding OpinionLevelSentiment.csv")
    labels_path = _find_one(root, "OpinionLevelSentiment.csv")
    videos: dict[str, list[tuple[int, float]]] = {}
    with open(labels_path, encoding="utf-8", newline="") as f:
        for row in csv.reader(f):
            if len(row) < 5:
                continue
            videos.setdefault(row[2], []).append((int(row[3]), float(row[4])))
    transcripts = {p.stem: p for p in root.rglob("*.annotprocessed")}
    audio = {p.stem: p for p in root.rglob("*.wav")}
    split_of = _mosi_splits(sorted(videos), split, folds, root, labels_path)
    drafts: dict[str, list[tuple[str, list[_Draft]]]] = {s: [] for s in SPLITS}
    for video in sorted(videos):
        if video not in split_of:
            continue
        lines = _mosi_transcript(transcripts.get(video))
        items = [
            _Draft(
                id=f"{video}_{segment}",
                speaker=video,
                transcript=lines.get(segment),
                audio=audio.get(f"{video}_{segment}"),
                label="negative" if score < 0 else "positive",
            )
            for segment, score in sorted(videos[video])
        ]
        drafts[split_of[video]].append((video, items))
    return _finish("mosi", drafts, require, on_missing, str(root))


def _find_one(root: Path, filename: str) -> Path:
    if (root / filename).is_file():
        return root / filename
    found = sorted(root.rglob(filename))
    if not found:
        raise CorpusError(f"--data-root {root}: no {filename} in it or below — point it at the CMU-MOSI release")
    return found[0]


def _mosi_splits(
    videos: list[str], split: str, folds: str | Path | None, root: Path, labels_path: Path
) -> dict[str, str]:
    if split == "paper":
        if len(videos) != sum(_MOSI_PAPER_SPLIT):
            raise CorpusError(
                f"{labels_path}: {len(videos)} videos, the paper's split needs {sum(_MOSI_PAPER_SPLIT)} — "
                "use the full OpinionLevelSentiment.csv, or --mosi-split sdk"
            )
        n_train, n_val, _ = _MOSI_PAPER_SPLIT
        return {v: "train" if i < n_train else "val" if i < n_train + n_val else "test" for i, v in enumerate(videos)}
    if split != "sdk":
        raise CorpusError(f"--mosi-split {split!r}: choose 'paper' or 'sdk'")
    path = Path(folds) if folds else _find_one(root, "sdk_folds.json")
    listed = json.loads(path.read_text(encoding="utf-8"))
    if set(listed) != set(SPLITS):
        raise CorpusError(f"{path}: keys {sorted(listed)} — it must hold lists 'train', 'val', 'test' of video ids")
    unknown = [v for s in SPLITS for v in listed[s] if v not in videos]
    if unknown:
        raise CorpusError(
            f"{path}: {len(unknown)} video ids (e.g. {unknown[0]}) are not in {labels_path.name} — check the folds file"
        )
    return {v: s for s in SPLITS for v in listed[s]}


def _mosi_transcript(path: Path | None) -> dict[int, str]:
    if path is None:
        return {}
    out = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        segment, sep, text = line.partition("_DELIM_")
        if sep and segment.strip().isdigit():
            out[int(segment)] = text.strip()
    return out


# -------------------------------------------------------------------------------------- EmoryNLP


def read_emorynlp(root: str | Path, require: Sequence[str] = ("text",), on_missing: str = "fail") -> Corpus:
    """EmoryNLP official splits (dev is our `val`); text only; a conversation is one scene."""
    root = Path(root)
    _check_root(root, "EmoryNLP", "the folder holding emorynlp_train_final.csv")
    if "audio" in require:
        raise CorpusError("--modality speech: EmoryNLP is text only — use --modality text")
    drafts: dict[str, list[tuple[str, list[_Draft]]]] = {}
    for split, filename in _EMORYNLP_FILES.items():
        scenes: dict[tuple[int, int, int], list[tuple[int, _Draft]]] = {}
        for row in _read_csv(root / filename):
            key = (int(row["Season"]), int(row["Episode"]), int(row["Scene_ID"]))
            u = int(row["Utterance_ID"])
            scenes.setdefault(key, []).append(
                (
                    u,
                    _Draft(
                        id=f"s{key[0]}_e{key[1]}_c{key[2]}_u{u}",
                        speaker=_speaker_list(row["Speaker"]),
                        transcript=row["Utterance"],
                        audio=None,
                        label=row["Emotion"].strip().lower(),
                    ),
                )
            )
        drafts[split] = [
            (f"s{s}_e{e}_c{c}", [d for _, d in sorted(items, key=lambda x: x[0])])
            for (s, e, c), items in sorted(scenes.items())
        ]
    return _finish("emorynlp", drafts, require, on_missing, str(root))


def _speaker_list(text: str) -> str:
    """`"['Monica Geller']"` -> `"Monica Geller"` (several speakers are joined with ', ')."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    return ", ".join(value) if isinstance(value, (list, tuple)) else str(value)


# ------------------------------------------------------------------------------------------ entry


def read_corpus(
    name: str,
    root: str | Path,
    require: Iterable[str] = ("text",),
    on_missing: str = "fail",
    mosi_split: str = "paper",
) -> Corpus:
    """Reads corpus `name` from `root`; `require` ⊆ {"text", "audio"} says which inputs must be present."""
    require = tuple(require)
    bad = [r for r in require if r not in MODALITIES]
    if bad:
        raise CorpusError(f"require={bad}: choose from {MODALITIES}")
    readers = {"iemocap": read_iemocap, "meld": read_meld, "emorynlp": read_emorynlp}
    if name == "mosi":
        return read_mosi(root, require, on_missing, split=mosi_split)
    if name == "custom":
        from encoders_torch.custom_corpus import read_custom  # it builds on this module

        return read_custom(root, require, on_missing)
    if name not in readers:
        raise CorpusError(f"--dataset {name!r}: choose one of {', '.join(DATASETS)}")
    return readers[name](root, require, on_missing)
