"""Conversations of your own: one JSONL or CSV file read into a `Corpus` (`--dataset custom`, docs/CUSTOM_CORPUS.md).

One utterance per JSON object (JSONL, one object a line) or per row (CSV, the first line names the columns):

* `conversation_id`, `utterance_id`, `speaker`: required, non-empty; utterance ids are unique in the file.
* `text`: the transcript, needed for `--modality text`; `audio`: the clip's path, relative to the file's
  folder (or absolute), needed for `--modality speech`. The other of the two may be left out.
* `label`: a class name; empty or absent: the utterance is unlabelled (label -1 in the store).
* `split`: `train`, `val` or `test`; empty or absent: `test`. All rows of a conversation share one split.
* `start`: a number (e.g. seconds). A conversation whose rows all have one is ordered by it (rows of
  equal start keep file order) and its rows may lie anywhere in the file; one whose rows have none
  is in file order and its rows must be contiguous.

Label names are the sorted set of the labels present, unless the first line of a JSONL file is a header
object `{"label_names": ["neutral", "happy", ...]}`: then those are the classes, in that order (the store's
class indices), and may include classes no row uses.

Every problem is one line `FILE:LINE: what — fix`, and all of a file's problems are raised together in
one `CorpusError`. Empty text (when text is required), an audio path that is empty or not a file (when
audio is required) and a label outside the header's names follow `on_missing` as in the other corpora:
`"fail"` reports them with the rest, `"skip"` drops those utterances and counts them in `Corpus.dropped`.

`write_custom` writes a corpus back as such a file (audio paths absolute), e.g. once `encoders_torch.asr`
has filled in the transcripts.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
from pathlib import Path
from typing import Sequence

from encoders_torch.corpora import SPLITS, Conversation, Corpus, CorpusError, Utterance

NAME = "custom"
IDS = ("conversation_id", "utterance_id", "speaker")
FIELDS = (*IDS, "text", "audio", "label", "split", "start")
HEADER_KEY = "label_names"
_MODALITY_FIELD = {"text": "text", "audio": "audio"}
_SKIP = "or pass --on-missing skip to drop the utterance"


Problem = tuple[int, str]  # (line, "what — fix")


@dataclasses.dataclass
class _Row:
    line: int
    conversation: str
    id: str
    speaker: str
    text: str | None
    audio: str | None  # as written in the file
    label: str | None
    split: str | None
    start: float | None  # NaN: written, but not a number (left out of the order checks)


def read_custom(path: str | Path, require: Sequence[str] = ("text",), on_missing: str = "fail") -> Corpus:
    """Reads a JSONL or CSV file of conversations (module docstring); `require` ⊆ {"text", "audio"}."""
    path = Path(path)
    if on_missing not in ("fail", "skip"):
        raise CorpusError(f"--on-missing {on_missing!r}: choose 'fail' or 'skip'")
    if not path.is_file():
        raise CorpusError(f"--data-root {path}: not a file — for --dataset custom pass your .jsonl or .csv file")
    kind = path.suffix.lower()
    if kind not in (".jsonl", ".csv"):
        raise CorpusError(
            f"--data-root {path}: for --dataset custom name a .jsonl or .csv file (docs/CUSTOM_CORPUS.md)"
        )
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise CorpusError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}) — save the file as UTF-8") from None
    needed = tuple(_MODALITY_FIELD[r] for r in require)
    records, header, problems = _jsonl(text) if kind == ".jsonl" else _csv(text, needed)
    rows, identified = [], []  # rows without problems; rows with ids (checked against each other)
    for line, record in records:
        row, issues = _parse(line, record, needed)
        problems += issues
        identified += [row] if row is not None else []
        rows += [row] if row is not None and not issues else []
    problems += _check_rows(identified)
    label_names = tuple(header) if header is not None else tuple(sorted({r.label for r in rows if r.label}))
    kept, dropped, missing = _usable(path.parent, rows, label_names, needed)
    if on_missing == "fail":
        problems += missing
    if problems:
        lines = [f"{path}:{line}: {what}" for line, what in sorted(problems, key=lambda p: p[0])]
        raise CorpusError("\n".join(lines))
    corpus = Corpus(NAME, label_names, _splits(path.parent, kept, label_names), dropped)
    if not any(corpus.splits.values()):
        raise CorpusError(f"{path}: no usable utterances — add rows (docs/CUSTOM_CORPUS.md shows the fields)")
    return corpus


def relabel(corpus: Corpus, label_names: Sequence[str]) -> Corpus:
    """`corpus` with class indices into `label_names` (a trained adapter's) when all its classes are among them;
    else `corpus` unchanged."""
    label_names = tuple(label_names)
    if corpus.label_names == label_names or not set(corpus.label_names) <= set(label_names):
        return corpus
    index = [label_names.index(name) for name in corpus.label_names]

    def moved(u: Utterance) -> Utterance:
        return dataclasses.replace(u, label=index[u.label] if u.label >= 0 else -1)

    splits = {
        split: tuple(Conversation(c.id, tuple(moved(u) for u in c.utterances)) for c in conversations)
        for split, conversations in corpus.splits.items()
    }
    return dataclasses.replace(corpus, label_names=label_names, splits=splits)


def write_custom(corpus: Corpus, path: str | Path) -> Path:
    """Writes `corpus` as a custom JSONL file that `read_custom` reads back to the same corpus: a header
    with its label names (when two or more), then every utterance in dialogue order, with its split and
    its audio path made absolute (so the file may live anywhere). Written to a temporary name, then renamed."""
    path = Path(path)
    lines = [json.dumps({HEADER_KEY: list(corpus.label_names)})] if len(corpus.label_names) >= 2 else []
    for split, conversations in corpus.splits.items():
        for c in conversations:
            for u in c.utterances:
                fields = {"conversation_id": c.id, "utterance_id": u.id, "speaker": u.speaker, "split": split}
                fields.update({"text": u.transcript} if u.transcript is not None else {})
                fields.update({"audio": str(Path(u.audio).absolute())} if u.audio is not None else {})
                fields.update({"label": corpus.label_names[u.label]} if u.label >= 0 else {})
                lines.append(json.dumps(fields, ensure_ascii=False))
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------- reading


def _jsonl(text: str) -> tuple[list[tuple[int, dict]], list[str] | None, list[Problem]]:
    """(line, object) per utterance, the header's label names (or None), problems."""
    records, header, problems, first = [], None, [], True
    for line, content in enumerate(text.split("\n"), 1):
        if not content.strip():
            continue
        try:
            value = json.loads(content)
        except json.JSONDecodeError as e:
            problems.append((line, f"not JSON ({e.msg}, column {e.colno}) — write one JSON object per line"))
            value = None
        if value is None:
            pass
        elif not isinstance(value, dict):
            problems.append((line, f"a JSON {type(value).__name__}, not an object — write one object per line"))
        elif HEADER_KEY in value and first:
            header, issue = _header(value)
            problems += [(line, issue)] if issue else []
        elif HEADER_KEY in value:
            problems.append((line, f"a {HEADER_KEY} header after the first line — move it to the first line"))
        else:
            records.append((line, value))
        first = False
    return records, header, problems


def _header(value: dict) -> tuple[list[str] | None, str | None]:
    names = value[HEADER_KEY]
    extra = sorted(set(value) - {HEADER_KEY})
    if extra:
        return None, f"the header has keys {extra} besides {HEADER_KEY} — keep only {HEADER_KEY} in it"
    if (
        not isinstance(names, list)
        or len(names) < 2
        or not all(isinstance(n, str) and n.strip() for n in names)
        or len({n.strip() for n in names}) != len(names)
    ):
        example = f'{{"{HEADER_KEY}": ["neutral", "happy"]}}'
        return None, f"{HEADER_KEY} must list two or more distinct class names, such as {example}"
    return [n.strip() for n in names], None


def _csv(text: str, needed: tuple[str, ...]) -> tuple[list[tuple[int, dict]], None, list[Problem]]:
    """(line, row) per utterance, no header labels, problems; the first line names the columns."""
    reader = csv.reader(io.StringIO(text, newline=""))
    columns = [c.strip() for c in next(reader, [])]
    absent = [f for f in (*IDS, *needed) if f not in columns]
    if absent:
        names = ", ".join(repr(f) for f in absent)
        return [], None, [(1, f"no column {names} — the first line must name the columns {', '.join(FIELDS)}")]
    records, problems = [], []
    while True:
        line = reader.line_num + 1
        values = next(reader, None)
        if values is None:
            return records, None, problems
        if not values:
            continue
        if len(values) != len(columns):
            problems.append(
                (
                    line,
                    f"{len(values)} fields, the first line names {len(columns)} — "
                    "put quotes around fields that hold commas or line breaks",
                )
            )
            continue
        records.append((line, dict(zip(columns, values))))


def _parse(line: int, record: dict, needed: tuple[str, ...]) -> tuple[_Row | None, list[Problem]]:
    """One record as a row and its problems (one for all missing fields, one per other defect); the row is None
    when it lacks a conversation_id or utterance_id, its split None when that is unknown."""
    problems, values, bad = [], {}, set()
    for key in FIELDS:
        value = record.get(key)
        if isinstance(value, bool) or not isinstance(value, (str, int, float, type(None))):
            problems.append((line, f"{key} is a JSON {type(value).__name__} — write it as a string"))
            value = None
            bad.add(key)
        values[key] = value if value is None or key == "start" else str(value)
    missing = [k for k in IDS if k not in bad and not (values[k] or "").strip()]
    missing += [k for k in needed if k not in record]
    if missing:
        names = ", ".join(repr(k) for k in missing)
        plural = "s" if len(missing) > 1 else ""
        problems.insert(0, (line, f"missing required field{plural} {names} — give this row a non-empty {names}"))
    split = (values["split"] or "").strip().lower() or "test"
    if split not in SPLITS:
        problems.append((line, f"split {values['split']!r} is unknown — use train, val or test (empty means test)"))
    start = values["start"]
    if isinstance(start, str):
        try:
            start = float(start) if start.strip() else None
        except ValueError:
            start = math.nan
    if start is not None and not math.isfinite(start):
        problems.append(
            (line, f"start {values['start']!r} is not a number — write a time such as 12.5, or leave it empty")
        )
    if {"conversation_id", "utterance_id"} & set(missing) or {"conversation_id", "utterance_id"} & bad:
        return None, problems
    conversation, utterance, speaker = ((values[k] or "").strip() for k in IDS)
    label, audio = (values["label"] or "").strip(), (values["audio"] or "").strip()
    split = split if split in SPLITS else None
    return _Row(
        line, conversation, utterance, speaker, values["text"], audio or None, label or None, split, start
    ), problems


# ------------------------------------------------------------------------------------- validation


def _check_rows(rows: list[_Row]) -> list[Problem]:
    """Duplicate ids, conversations across splits, partly timed, or interleaved without start times."""
    problems, first_line = [], {}
    by_conversation: dict[str, list[_Row]] = {}
    for row in rows:
        if row.id in first_line:
            problems.append(
                (
                    row.line,
                    f"utterance_id {row.id!r} is already on line {first_line[row.id]} — "
                    "give every utterance its own id",
                )
            )
        first_line.setdefault(row.id, row.line)
        by_conversation.setdefault(row.conversation, []).append(row)
    for conversation, members in by_conversation.items():
        split_given, timed = (
            [r for r in members if r.split],
            [r for r in members if r.start is not None and math.isfinite(r.start)],
        )
        head = split_given[0] if split_given else None
        for row in split_given[1:]:
            if row.split != head.split:
                problems.append(
                    (
                        row.line,
                        f"split {row.split!r}, but conversation {conversation!r} is in {head.split!r} on line "
                        f"{head.line} — give all rows of a conversation one split",
                    )
                )
        if timed and len(timed) < len(members):
            problems += [
                (
                    r.line,
                    f"no start, but conversation {conversation!r} has one on line {timed[0].line} — "
                    f"give every row of {conversation!r} a start, or none",
                )
                for r in members
                if r.start is None
            ]
    ended: dict[str, _Row] = {}  # conversation -> the first row of another conversation after it
    for previous, row in zip(rows, rows[1:]):
        if row.conversation == previous.conversation:
            continue
        ended.setdefault(previous.conversation, row)
        other = ended.get(row.conversation)
        if (
            other is not None
            and row.start is None
            and not any(r.start is not None for r in by_conversation[row.conversation])
        ):
            problems.append(
                (
                    row.line,
                    f"conversation {row.conversation!r} continues here after rows of {other.conversation!r} "
                    f"(from line {other.line}) and has no start times to order by — keep each conversation's "
                    "rows together in dialogue order, or give them a start",
                )
            )
    return problems


def _usable(
    folder: Path, rows: list[_Row], label_names: tuple[str, ...], needed: tuple[str, ...]
) -> tuple[list[_Row], dict[str, int], list[Problem]]:
    """(rows with what `needed` asks for and a known label, dropped counts by reason, one problem per other row)."""
    kept, dropped, problems = [], {}, []
    for row in rows:
        if row.label is not None and row.label not in label_names:
            reason, what = (
                "unknown label",
                f"label {row.label!r} is not in the header's {HEADER_KEY} — fix it or add it",
            )
        elif "text" in needed and not (row.text and row.text.strip()):
            reason, what = "no transcript", "empty text — write the transcript"
        elif "audio" in needed and row.audio is None:
            reason, what = "no audio file", "empty audio — give the path of the clip"
        elif "audio" in needed and not (folder / row.audio).is_file():
            reason, what = (
                "no audio file",
                f"audio {row.audio!r} is not a file ({(folder / row.audio).absolute()}) — fix the path",
            )
        else:
            kept.append(row)
            continue
        dropped[reason] = dropped.get(reason, 0) + 1
        problems.append((row.line, f"{what}, {_SKIP}"))
    return kept, dropped, problems


def _splits(folder: Path, rows: list[_Row], label_names: tuple[str, ...]) -> dict[str, tuple[Conversation, ...]]:
    """Conversations per split in order of first appearance; utterances by start time, else in file order."""
    grouped: dict[str, dict[str, list[_Row]]] = {s: {} for s in SPLITS}
    for row in rows:
        grouped[row.split].setdefault(row.conversation, []).append(row)

    def utterance(r: _Row) -> Utterance:
        label = -1 if r.label is None else label_names.index(r.label)
        return Utterance(r.id, r.speaker, r.text, None if r.audio is None else folder / r.audio, label)

    return {
        split: tuple(
            Conversation(c, tuple(utterance(r) for r in sorted(members, key=lambda r: (r.start or 0.0, r.line))))
            for c, members in conversations.items()
        )
        for split, conversations in grouped.items()
    }
