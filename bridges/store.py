"""The `mister-features` store (DESIGN §2): utterance embeddings, conversation structure and labels.

Layout of one dataset::

    <root>/<dataset>/manifest.json
    <root>/<dataset>/<split>/index.npz        utterance_id str [N], conversation_id str [N], label int32 [N]
    <root>/<dataset>/<split>/<modality>.npy   float32 | float16 [N, D]; row i belongs to index row i

Writers put every file in place atomically (temporary name, then `os.replace`), so a crash leaves
the previous version readable. Readers memory-map the arrays: opening a store reads headers only.

Besides DESIGN §2's fields, the manifest may hold ``encoders``: per modality, the corpus sessions the
encoder behind its features was fine-tuned on and those its model selection scored (a
leave-one-session-out fold may only test on a session in neither; `mister_jax.folds`)::

    "encoders": {"text": {"fold": 2, "trained_on": ["Ses01", "Ses04", "Ses05"], "selected_on": ["Ses03"]}}

``fold`` is the fold the features were extracted for (``encoders_torch.extract --fold K``) or null;
an encoder never fine-tuned on the corpus has empty lists. The field is optional (a reader of
DESIGN §2 ignores it); when present it is validated, and `write_modality` replaces a modality's entry
with what it is given (none: the entry goes, the new features' sessions being unknown).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np

FORMAT = "mister-features"
VERSION = 1
SPLITS = ("train", "val", "test")
LABELLED_SPLITS = ("train", "val")  # training and model selection need their labels
DTYPES = ("float32", "float16")
MANIFEST = "manifest.json"
INDEX = "index.npz"
_FINITE_CHECK_ROWS = 4096

_BY_HAND = "write it with bridges.write_index / bridges.write_modality, or by hand per DESIGN §2"


class StoreError(Exception):
    """A store that cannot be used; `problems` holds one line per defect: `<file>: <what> — <fix>`."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


@dataclasses.dataclass(frozen=True)
class Conversation:
    """One conversation: rows `start:stop` of its split, in dialogue order."""

    id: str
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


# --------------------------------------------------------------------------------------- writing


@contextlib.contextmanager
def _atomic_path(path: Path, suffix: str) -> Iterator[Path]:
    """Yields a temporary path beside `path`; renames it onto `path` if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; stores are shared read-only
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_manifest(dataset_dir: str | os.PathLike, manifest: Mapping) -> None:
    """Writes `manifest.json` atomically."""
    path = Path(dataset_dir) / MANIFEST
    with _atomic_path(path, ".json") as tmp:
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def _not_readable(path) -> str:
    """`<path>: not readable — check its permissions`, naming instead the first folder on the way to `path`
    that cannot be entered (every file below it is unreadable too)."""
    path = Path(path)
    blocked = next((folder for folder in reversed(path.parents) if not os.access(folder, os.X_OK)), path)
    return f"{blocked}: not readable — check its permissions"


def read_manifest(dataset_dir: str | os.PathLike) -> dict:
    path = Path(dataset_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StoreError([f"{path}: missing — no feature store here; {_BY_HAND}"]) from None
    except PermissionError:
        raise StoreError([_not_readable(path)]) from None
    except NotADirectoryError:
        file = next((p for p in reversed(path.parents) if p.is_file()), Path(dataset_dir))
        raise StoreError(
            [
                f"{file}: is a file, not a store folder — pass the dataset folder <root>/<dataset>, "
                f"the one that holds {MANIFEST}"
            ]
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreError([f"{path}: not valid JSON ({e}) — rewrite the manifest per DESIGN §2"]) from None
    if not isinstance(manifest, dict):
        raise StoreError([f"{path}: not a JSON object — rewrite the manifest per DESIGN §2"])
    return manifest


def init_store(
    root: str | os.PathLike,
    dataset: str,
    label_names: Sequence[str],
    splits: Sequence[str] = SPLITS,
) -> Path:
    """Creates `<root>/<dataset>/manifest.json`, or checks that an existing one agrees.

    Text and speech may be written by separate runs in either order: the second run finds the
    manifest of the first and keeps its modalities.
    """
    dataset_dir = Path(root) / dataset
    path = dataset_dir / MANIFEST
    if path.exists():
        manifest = read_manifest(dataset_dir)
        if list(manifest.get("label_names", [])) != list(label_names):
            raise StoreError(
                [
                    f"{path}: label_names {manifest.get('label_names')} differ from {list(label_names)} — "
                    "write into a fresh --out, or delete the old store"
                ]
            )
        merged = list(manifest.get("splits", []))
        merged += [s for s in splits if s not in merged]
        manifest["splits"] = merged
    else:
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "dataset": dataset,
            "label_names": list(label_names),
            "splits": list(splits),
            "modalities": {},
        }
    write_manifest(dataset_dir, manifest)
    return dataset_dir


def write_index(
    dataset_dir: str | os.PathLike,
    split: str,
    utterance_ids: Sequence[str],
    conversation_ids: Sequence[str],
    labels: Sequence[int],
) -> None:
    """Writes `<split>/index.npz` atomically; an existing index must match it exactly."""
    path = Path(dataset_dir) / split / INDEX
    utterance_ids = np.asarray(utterance_ids, dtype=str)
    conversation_ids = np.asarray(conversation_ids, dtype=str)
    labels = np.asarray(labels, dtype=np.int32)
    if not utterance_ids.shape == conversation_ids.shape == labels.shape or utterance_ids.ndim != 1:
        raise StoreError(
            [
                f"{path}: utterance_id {utterance_ids.shape}, conversation_id {conversation_ids.shape} and "
                f"label {labels.shape} must be 1-D of one length — pass one entry per utterance"
            ]
        )
    problems = _conversation_problems(path, conversation_ids)
    if problems:
        raise StoreError(problems)
    if path.exists():
        old = _load_index(path)
        same = (
            np.array_equal(old["utterance_id"], utterance_ids)
            and np.array_equal(old["conversation_id"], conversation_ids)
            and np.array_equal(old["label"], labels)
        )
        if not same:
            raise StoreError(
                [
                    f"{path}: exists and lists other utterances or labels — modalities of one store must "
                    "share one index; write into a fresh --out or delete this split"
                ]
            )
        return
    with _atomic_path(path, ".npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, utterance_id=utterance_ids, conversation_id=conversation_ids, label=labels)


def write_modality(
    dataset_dir: str | os.PathLike,
    split: str,
    modality: str,
    features: np.ndarray,
    source: Mapping | None = None,
    encoder_sessions: Mapping | None = None,
) -> None:
    """Writes `<split>/<modality>.npy` ([N, D] float32 or float16) atomically and records it in the manifest.

    The split's index must be written first; other modalities are left untouched. `encoder_sessions`
    (``{"fold": K | None, "trained_on": [...], "selected_on": [...]}``) becomes the manifest's
    ``encoders[modality]``; without it that entry is removed (module docstring).
    """
    dataset_dir = Path(dataset_dir)
    path = dataset_dir / split / f"{modality}.npy"
    features = np.asarray(features)
    if features.dtype.name not in DTYPES:
        features = features.astype(np.float32)
    if features.ndim != 2:
        raise StoreError([f"{path}: features have shape {features.shape} — pass one row per utterance, [N, D]"])
    index_path = dataset_dir / split / INDEX
    if not index_path.exists():
        raise StoreError([f"{index_path}: missing — call write_index for split '{split}' before its features"])
    n = len(_load_index(index_path)["label"])
    if features.shape[0] != n:
        raise StoreError(
            [f"{path}: {features.shape[0]} rows but {index_path} lists {n} utterances — one row per utterance"]
        )
    if not np.isfinite(features).all():
        raise StoreError([f"{path}: features contain NaN or Inf — fix the encoder output before writing"])
    manifest = read_manifest(dataset_dir)
    declared = manifest.setdefault("modalities", {}).get(modality)
    if declared and (declared["dim"] != features.shape[1] or declared["dtype"] != features.dtype.name):
        raise StoreError(
            [
                f"{path}: [{features.shape[1]}] {features.dtype.name} disagrees with the manifest's "
                f"[{declared['dim']}] {declared['dtype']} for other splits — write every split with one encoder"
            ]
        )
    if encoder_sessions is not None:
        problems = _encoder_problems(dataset_dir / MANIFEST, modality, encoder_sessions)
        if problems:
            raise StoreError(problems)
    with _atomic_path(path, ".npy") as tmp:
        np.save(tmp, features)
    encoders = manifest.pop("encoders", {})
    if not isinstance(encoders, dict):
        encoders = {}
    encoders.pop(modality, None)
    if encoder_sessions is not None:
        encoders[modality] = {
            "fold": encoder_sessions.get("fold"),
            "trained_on": list(encoder_sessions["trained_on"]),
            "selected_on": list(encoder_sessions["selected_on"]),
        }
    if encoders:
        manifest["encoders"] = encoders
    manifest["modalities"][modality] = {
        "dim": int(features.shape[1]),
        "dtype": features.dtype.name,
        "source": dict(source if source is not None else (declared or {}).get("source", {})),
    }
    write_manifest(dataset_dir, manifest)


# --------------------------------------------------------------------------------------- reading


def _load_index(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in ("utterance_id", "conversation_id", "label")}
    except FileNotFoundError:
        raise StoreError([f"{path}: missing — {_BY_HAND}"]) from None
    except KeyError as e:
        raise StoreError([f"{path}: lacks array {e} — it must hold utterance_id, conversation_id, label"]) from None
    except PermissionError:
        raise StoreError([_not_readable(path)]) from None
    except Exception as e:  # zipfile / pickle / truncated-file errors all mean the same to a user
        raise StoreError([f"{path}: unreadable ({type(e).__name__}: {e}) — rewrite this split's index"]) from None


def _conversation_problems(path: Path, conversation_ids: np.ndarray) -> list[str]:
    """Rows of one conversation must be contiguous."""
    if len(conversation_ids) == 0:
        return [f"{path}: no utterances — drop the split from the manifest or fill it"]
    starts = np.flatnonzero(np.r_[True, conversation_ids[1:] != conversation_ids[:-1]])
    runs = conversation_ids[starts]
    unique, counts = np.unique(runs, return_counts=True)
    split_up = unique[counts > 1]
    if len(split_up):
        return [
            f"{path}: conversation {split_up[0]!r} (and {len(split_up) - 1} more) is not contiguous — "
            "write the rows of each conversation together, in dialogue order"
        ]
    return []


class Split:
    """One split of a store: index arrays in memory, feature arrays memory-mapped."""

    def __init__(self, directory: Path, index: dict[str, np.ndarray], features: dict[str, np.ndarray]):
        self.directory = directory
        self.utterance_ids = index["utterance_id"]
        self.conversation_ids = index["conversation_id"]
        self.labels = index["label"].astype(np.int32)
        self._features = features

    def __len__(self) -> int:
        return len(self.labels)

    def features(self, modality: str) -> np.ndarray:
        """The memory-mapped `[N, D]` array of `modality`."""
        try:
            return self._features[modality]
        except KeyError:
            raise StoreError(
                [
                    f"{self.directory / (modality + '.npy')}: modality '{modality}' is not in this store "
                    f"(it has {sorted(self._features)}) — extract it with python -m encoders_torch.extract "
                    f"--modality {modality}, or choose a variant that does not need it"
                ]
            ) from None

    def conversations(self) -> list[Conversation]:
        """Conversations in file order, each a contiguous row range."""
        ids = self.conversation_ids
        starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
        stops = np.r_[starts[1:], len(ids)]
        return [Conversation(str(ids[a]), int(a), int(b)) for a, b in zip(starts, stops)]


class FeatureStore:
    """A validated, read-only view of `<root>/<dataset>`."""

    def __init__(self, directory: Path, manifest: dict, splits: dict[str, Split]):
        self.directory = directory
        self.manifest = manifest
        self._splits = splits

    @property
    def dataset(self) -> str:
        return self.manifest["dataset"]

    @property
    def label_names(self) -> list[str]:
        return list(self.manifest["label_names"])

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self._splits)

    @property
    def modalities(self) -> dict[str, dict]:
        return dict(self.manifest["modalities"])

    @property
    def encoders(self) -> dict[str, dict]:
        """Per modality, the sessions its encoder was fine-tuned and selected on (module docstring);
        a modality without a record is absent."""
        return dict(self.manifest.get("encoders", {}))

    def split(self, name: str) -> Split:
        try:
            return self._splits[name]
        except KeyError:
            raise StoreError(
                [
                    f"{self.directory / MANIFEST}: no split '{name}' (it has {list(self._splits)}) — "
                    f"extract the '{name}' split, or see the trainer's --no-val flag"
                ]
            ) from None

    @classmethod
    def open(cls, path: str | os.PathLike) -> "FeatureStore":
        """Opens and validates the structure of a store; reads headers and indices, never the arrays.

        Raises `StoreError` listing every problem. Values (NaN/Inf) are checked by `check_values`.
        """
        directory = Path(path)
        try:
            return cls._open(directory)
        except PermissionError as e:
            raise StoreError([_not_readable(e.filename or directory)]) from None

    @classmethod
    def _open(cls, directory: Path) -> "FeatureStore":
        manifest = read_manifest(directory)
        problems = _manifest_problems(directory / MANIFEST, manifest)
        if problems:
            raise StoreError(problems)
        splits: dict[str, Split] = {}
        n_labels = len(manifest["label_names"])
        for name in manifest["splits"]:
            split_dir = directory / name
            try:
                index = _load_index(split_dir / INDEX)
            except StoreError as e:
                problems += e.problems
                continue
            problems += _index_problems(split_dir / INDEX, index, n_labels)
            if name in LABELLED_SPLITS and len(index["label"]) and np.all(index["label"] < 0):
                problems.append(
                    f"{split_dir / INDEX}: no labelled utterance (every label is -1), but the {name} "
                    f"split needs labels — write the class indices with bridges.write_index"
                )
            features = {}
            for modality, spec in manifest["modalities"].items():
                array, issue = _open_modality(split_dir / f"{modality}.npy", spec, len(index["label"]))
                if issue:
                    problems.append(issue)
                else:
                    features[modality] = array
            splits[name] = Split(split_dir, index, features)
        if problems:
            raise StoreError(problems)
        return cls(directory, manifest, splits)

    def check_values(self) -> list[str]:
        """Scans every feature array once, in row chunks, for NaN or Inf."""
        problems = []
        for name, split in self._splits.items():
            for modality in self.manifest["modalities"]:
                array = split.features(modality)
                for start in range(0, len(array), _FINITE_CHECK_ROWS):
                    chunk = np.asarray(array[start : start + _FINITE_CHECK_ROWS])
                    if not np.isfinite(chunk).all():
                        row = start + int(np.flatnonzero(~np.isfinite(chunk).all(axis=1))[0])
                        problems.append(
                            f"{split.directory / (modality + '.npy')}: NaN or Inf at row {row} "
                            f"(utterance {split.utterance_ids[row]}) — re-extract this modality"
                        )
                        break
        return problems


def _manifest_problems(path: Path, manifest: dict) -> list[str]:
    fix = "rewrite the manifest per DESIGN §2"
    if manifest.get("format") != FORMAT:
        return [f"{path}: format is {manifest.get('format')!r}, expected {FORMAT!r} — {fix}"]
    if manifest.get("version") != VERSION:
        return [
            f"{path}: version {manifest.get('version')!r} is not supported (this reader knows {VERSION}) — "
            "re-export the store with this version of mister"
        ]
    problems = []
    labels = manifest.get("label_names")
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        problems.append(f"{path}: label_names must be a non-empty list of strings — {fix}")
    elif len(labels) < 2:
        problems.append(
            f"{path}: label_names lists {len(labels)} class ({labels[0]!r}); emotion recognition needs "
            f"at least two — list every class of the corpus in label_names"
        )
    splits = manifest.get("splits")
    if not isinstance(splits, list) or not splits:
        problems.append(f"{path}: splits must be a non-empty list such as {list(SPLITS)} — {fix}")
    modalities = manifest.get("modalities")
    if not isinstance(modalities, dict) or not modalities:
        problems.append(f"{path}: no modalities declared — write at least one with bridges.write_modality")
    else:
        for name, spec in modalities.items():
            if not isinstance(spec, dict) or not isinstance(spec.get("dim"), int) or spec.get("dim", 0) <= 0:
                problems.append(f"{path}: modality '{name}' needs a positive integer 'dim' — {fix}")
            elif spec.get("dtype") not in DTYPES:
                problems.append(
                    f"{path}: modality '{name}' has dtype {spec.get('dtype')!r}, expected one of {DTYPES} — {fix}"
                )
    encoders = manifest.get("encoders", {})
    if not isinstance(encoders, dict):
        problems.append(f"{path}: encoders must be an object mapping a modality to its encoder's sessions — {fix}")
    else:
        for name, record in encoders.items():
            if isinstance(modalities, dict) and name not in modalities:
                problems.append(
                    f"{path}: encoders lists modality '{name}', which the manifest does not declare — "
                    f"drop that entry, or re-extract the modality"
                )
            else:
                problems += _encoder_problems(path, name, record)
    return problems


def _encoder_problems(path: Path, modality: str, record) -> list[str]:
    """What is wrong with one ``encoders`` entry (module docstring), one line."""
    shape = '{"fold": K or null, "trained_on": ["Ses01", ...], "selected_on": [...]}'
    fix = f"write it as {shape} (the sessions the encoder was fine-tuned and selected on)"
    if not isinstance(record, Mapping):
        return [f"{path}: encoders.{modality} is not an object — {fix}"]
    for key in ("trained_on", "selected_on"):
        sessions = record.get(key)
        if not isinstance(sessions, list) or not all(isinstance(x, str) and x for x in sessions):
            return [f"{path}: encoders.{modality}.{key} must be a list of session names — {fix}"]
    fold = record.get("fold")
    if fold is not None and (isinstance(fold, bool) or not isinstance(fold, int) or fold < 1):
        return [f"{path}: encoders.{modality}.fold is {fold!r}, not a fold number (1, 2, ...) or null — {fix}"]
    return []


def _index_problems(path: Path, index: dict[str, np.ndarray], n_labels: int) -> list[str]:
    n = {k: v.shape for k, v in index.items()}
    if len({s for s in n.values()}) != 1 or index["label"].ndim != 1:
        return [f"{path}: arrays disagree in shape {n} — one entry per utterance in each"]
    if not np.issubdtype(index["label"].dtype, np.integer):
        return [
            f"{path}: label has dtype {index['label'].dtype}, expected int32 — store class indices, -1 if unlabelled"
        ]
    labels = index["label"]
    bad = (labels < -1) | (labels >= n_labels)
    problems = []
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        problems.append(
            f"{path}: label {int(labels[row])} at row {row} is outside [-1, {n_labels}) "
            f"({int(bad.sum())} rows) — labels index manifest label_names, -1 for unlabelled"
        )
    return problems + _conversation_problems(path, index["conversation_id"].astype(str))


def _open_modality(path: Path, spec: dict, n_rows: int) -> tuple[np.ndarray | None, str | None]:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        return None, f"{path}: missing, but the manifest declares this modality — write it for this split ({_BY_HAND})"
    except PermissionError:
        return None, _not_readable(path)
    except Exception as e:
        return None, f"{path}: unreadable or truncated ({e}) — re-extract this modality"
    if array.ndim != 2:
        return None, f"{path}: shape {array.shape} is not [N, D] — write one row per utterance"
    if array.shape[0] != n_rows:
        return None, f"{path}: {array.shape[0]} rows but the index lists {n_rows} utterances — re-extract this split"
    if array.shape[1] != spec["dim"]:
        return (
            None,
            f"{path}: dim {array.shape[1]} but the manifest says {spec['dim']} — re-extract, or fix the manifest",
        )
    if array.dtype.name != spec["dtype"]:
        return (
            None,
            f"{path}: dtype {array.dtype.name} but the manifest says {spec['dtype']} — re-extract, or fix the manifest",
        )
    return array, None
