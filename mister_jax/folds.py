"""IEMOCAP leave-one-session-out (LOSO) folds: which sessions each fold tests, validates and trains on,
their splits, and the refusal of features whose encoder saw a fold's test session.

    python -m mister_jax.train --dataset iemocap --protocol loso [--features ROOT] [--out DIR]

Fold k tests on session k, validates on the next one (cyclic: fold 5, the paper's split, validates on Ses01)
and trains on the other three; IEMOCAP's sessions have disjoint speakers, so each fold is speaker-independent.

The utterances of a fold come from all of a store's splits pooled (`fold_splits`), grouped by the
session in their ids (``Ses01F_impro01_F000`` → ``Ses01``). Features from an encoder fine-tuned (or
selected) on a fold's test session would leak it: the store's manifest records per modality the
sessions its encoder saw (``encoders``, `bridges.store`), and `check_fold_encoders` refuses a fold whose
test session is among them. ``python -m encoders_torch.extract --dataset iemocap --fold K --out ROOT``
writes fold K's store to ``ROOT/iemocap-foldK`` (encoder fine-tuned on its train sessions, selected on
its val session, every utterance exported); `open_fold_stores` takes that store for fold K and
``ROOT/iemocap`` for a fold without one.

`mister_jax.loso.train_loso` runs the folds.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from bridges import FeatureStore
from mister_jax.errors import UsageError
from mister_jax.input_pipeline import (
    SplitData,
    load_split,
    open_store_at,
    select_conversations,
)

FOLD_RULE = (
    "fold k tests on session k, validates on the next session (cyclic: the last fold validates on "
    "the first session) and trains on the others"
)
SPEAKERS = (
    "IEMOCAP's sessions have disjoint speakers (one pair of actors each), so testing on a held-out "
    "session is speaker-independent"
)
_SESSION = re.compile(r"^(Ses\d{2})")


def session_of(utterance_id: str) -> str:
    """The IEMOCAP session of an utterance id (``Ses03M_script01_1_F012`` → ``Ses03``); ValueError
    for an id that does not start with one."""
    match = _SESSION.match(str(utterance_id))
    if match is None:
        raise ValueError(f"utterance id {str(utterance_id)!r} does not start with an IEMOCAP session (Ses01 ... Ses05)")
    return match.group(1)


@dataclasses.dataclass(frozen=True)
class Fold:
    """One fold: its number (1-based) and the sessions it tests, validates and trains on."""

    index: int
    test: str
    val: str
    train: tuple[str, ...]

    def describe(self) -> str:
        return f"fold {self.index}: test {self.test}, val {self.val}, train {', '.join(self.train)}"


def loso_folds(sessions: Sequence[str]) -> list[Fold]:
    """The folds of `FOLD_RULE` over the distinct ``sessions`` in sorted order (fold k tests the k-th)."""
    sessions = sorted(set(sessions))
    if len(sessions) < 3:
        raise ValueError(f"leave-one-session-out needs at least 3 sessions (test, val, train), got {sessions}")
    pairs = [(s, sessions[(k + 1) % len(sessions)]) for k, s in enumerate(sessions)]
    return [Fold(k + 1, t, v, tuple(x for x in sessions if x not in (t, v))) for k, (t, v) in enumerate(pairs)]


def _manifest(store: FeatureStore) -> Path:
    return store.directory / "manifest.json"


def store_sessions(store: FeatureStore) -> list[str]:
    """The sorted sessions of every utterance of every split of ``store`` (reads the indices only)."""
    sessions = set()
    for name in store.splits:
        try:
            sessions |= {session_of(u) for u in np.unique(store.split(name).utterance_ids)}
        except ValueError as err:
            raise UsageError(
                f"{store.directory / name / 'index.npz'}: {err} — leave-one-session-out needs IEMOCAP's utterance ids"
            ) from None
    return sorted(sessions)


def pool_splits(store: FeatureStore, modalities: Sequence[str]) -> SplitData:
    """Every split of ``store`` in one `SplitData` (splits in manifest order); an utterance listed twice
    is refused, since it could then sit on both sides of a fold."""
    parts = [load_split(store, name, modalities) for name in store.splits]
    ids = np.concatenate([p.utterance_ids for p in parts])
    unique, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise UsageError(
            f"{_manifest(store)}: utterance {str(unique[counts > 1][0])!r} appears in more than one "
            f"split — each utterance must be in exactly one split; re-extract the store"
        )
    lengths = np.concatenate([p.lengths for p in parts])
    return SplitData(
        name="all",
        features={m: np.concatenate([p.features[m] for p in parts]) for m in modalities},
        labels=np.concatenate([p.labels for p in parts]),
        utterance_ids=ids,
        conversation_ids=np.concatenate([p.conversation_ids for p in parts]),
        starts=np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64),
        lengths=lengths,
    )


def fold_splits(store: FeatureStore, fold: Fold, modalities: Sequence[str]) -> tuple[SplitData, SplitData, SplitData]:
    """``(train, val, test)`` of ``fold``: the conversations of all of the store's splits pooled, by the
    session of their utterances (a conversation spanning two sessions is refused)."""
    data = pool_splits(store, modalities)
    session = np.empty(data.num_conversations, dtype=object)
    for c, (start, n) in enumerate(zip(data.starts, data.lengths)):
        found = {session_of(u) for u in data.utterance_ids[start : start + n]}
        if len(found) != 1:
            raise UsageError(
                f"{_manifest(store)}: conversation {data.conversation_ids[start]!r} holds utterances "
                f"of sessions {sorted(found)} — a conversation must lie in one session"
            )
        session[c] = found.pop()
    parts = []
    for name, sessions in (("train", fold.train), ("val", (fold.val,)), ("test", (fold.test,))):
        part = select_conversations(data, np.flatnonzero(np.isin(session, sessions)), name)
        if not (part.labels >= 0).any():
            raise UsageError(
                f"{_manifest(store)}: {fold.describe()}; its {name} part ({', '.join(sessions)}) has "
                f"no labelled utterance in this store — extract every session (no --max-utterances)"
            )
        parts.append(part)
    return tuple(parts)


def fold_problem(store: FeatureStore, fold: Fold, modalities: Sequence[str] | None = None) -> str | None:
    """The one line that refuses ``fold`` on ``store``'s features, or None: a modality whose encoder was
    fine-tuned or selected on the fold's test session, or one whose sessions the manifest does not record."""
    modalities = list(store.modalities) if modalities is None else list(modalities)
    out = store.directory.parent
    fix = (
        f"extract fold {fold.index}'s features with `python -m encoders_torch.extract --dataset iemocap --fold "
        f"{fold.index} --modality MODALITY ... --out {out}` (writes {out}/iemocap-fold{fold.index})"
    )
    if unknown := [m for m in modalities if m not in store.encoders]:
        return (
            f"{_manifest(store)}: records no encoder sessions for {', '.join(unknown)} (manifest field "
            f"'encoders'), so {fold.describe()} cannot be shown not to leak its test session — {fix}, or "
            f"record the sessions with bridges.write_modality(..., encoder_sessions=...)"
        )
    seen = {
        m: [
            word
            for key, word in (("trained_on", "fine-tuned"), ("selected_on", "selected"))
            if fold.test in store.encoders[m][key]
        ]
        for m in modalities
    }
    if leaks := [f"{m} was {' and '.join(seen[m])} on {fold.test}" for m in modalities if seen[m]]:
        return (
            f"{_manifest(store)}: {fold.describe()} would leak its test session: the encoder of "
            f"{'; '.join(leaks)} — {fix}"
        )
    return None


def check_fold_encoders(store: FeatureStore, fold: Fold, modalities: Sequence[str] | None = None) -> None:
    """Raises `UsageError` (`fold_problem`'s line) unless ``store``'s encoders of ``modalities`` (default:
    all of the store's) never saw ``fold``'s test session."""
    if problem := fold_problem(store, fold, modalities):
        raise UsageError(problem)


def open_fold_stores(root, dataset: str) -> dict[int, FeatureStore]:
    """Fold number → store: ``ROOT/DATASET-foldK`` where it exists, else ``ROOT/DATASET``; the folds come
    from the sessions of the stores, which must all hold the same ones."""
    root = Path(root)
    base = root / dataset
    found = {
        int(p.name.rpartition("-fold")[2]): p
        for p in root.glob(f"{dataset}-fold[0-9]*")
        if p.name.rpartition("-fold")[2].isdigit() and (p / "manifest.json").exists()
    }
    if not found and not (base / "manifest.json").exists():
        raise UsageError(
            f"{base}: no feature store, and no {root}/{dataset}-foldK — extract each fold with "
            f"`python -m encoders_torch.extract --dataset {dataset} --fold K --out {root} ...`"
        )
    paths = {*found.values(), *([base] if (base / "manifest.json").exists() else [])}
    opened = {path: open_store_at(path) for path in paths}
    sessions = {path: store_sessions(store) for path, store in opened.items()}
    reference = sessions[min(sessions, key=str)]
    for path, s in sessions.items():
        if s != reference:
            raise UsageError(
                f"{path / 'manifest.json'}: holds sessions {s}, but {min(sessions, key=str)} holds "
                f"{reference} — every fold's store must export all sessions"
            )
    stores = {}
    for fold in loso_folds(reference):
        path = found.get(fold.index, base)
        if path not in opened:
            raise UsageError(
                f"{path}: no feature store for {fold.describe()} — extract it with `python -m "
                f"encoders_torch.extract --dataset {dataset} --fold {fold.index} --out {root} ...`"
            )
        stores[fold.index] = opened[path]
    return stores
