"""IEMOCAP leave-one-session-out (LOSO): five folds, each a normal run, and their aggregate.

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

`train_loso` trains fold k into ``DIR/fold_<k>`` (`train_and_evaluate`, resumable; a complete fold is
skipped), then writes ``DIR/results.json`` and ``DIR/report.md``.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from bridges import FeatureStore
from mister_jax import atomic
from mister_jax.config import Config
from mister_jax.errors import UsageError
from mister_jax.input_pipeline import (
    SplitData,
    fit_to_store,
    load_split,
    open_store_at,
    required_modalities,
    select_conversations,
)
from mister_jax.metrics import mean_std
from mister_jax.train import train_and_evaluate

FOLD_RULE = ("fold k tests on session k, validates on the next session (cyclic: the last fold validates on "
             "the first session) and trains on the others")
SPEAKERS = ("IEMOCAP's sessions have disjoint speakers (one pair of actors each), so testing on a held-out "
            "session is speaker-independent")
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
            raise UsageError(f"{store.directory / name / 'index.npz'}: {err} — leave-one-session-out needs "
                             f"IEMOCAP's utterance ids") from None
    return sorted(sessions)


def pool_splits(store: FeatureStore, modalities: Sequence[str]) -> SplitData:
    """Every split of ``store`` in one `SplitData` (splits in manifest order); an utterance listed twice
    is refused, since it could then sit on both sides of a fold."""
    parts = [load_split(store, name, modalities) for name in store.splits]
    ids = np.concatenate([p.utterance_ids for p in parts])
    unique, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise UsageError(f"{_manifest(store)}: utterance {str(unique[counts > 1][0])!r} appears in more than one "
                         f"split — each utterance must be in exactly one split; re-extract the store")
    lengths = np.concatenate([p.lengths for p in parts])
    return SplitData(name="all", features={m: np.concatenate([p.features[m] for p in parts]) for m in modalities},
                     labels=np.concatenate([p.labels for p in parts]), utterance_ids=ids,
                     conversation_ids=np.concatenate([p.conversation_ids for p in parts]),
                     starts=np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64), lengths=lengths)


def fold_splits(store: FeatureStore, fold: Fold, modalities: Sequence[str]) -> tuple[SplitData, SplitData, SplitData]:
    """``(train, val, test)`` of ``fold``: the conversations of all of the store's splits pooled, by the
    session of their utterances (a conversation spanning two sessions is refused)."""
    data = pool_splits(store, modalities)
    session = np.empty(data.num_conversations, dtype=object)
    for c, (start, n) in enumerate(zip(data.starts, data.lengths)):
        found = {session_of(u) for u in data.utterance_ids[start:start + n]}
        if len(found) != 1:
            raise UsageError(f"{_manifest(store)}: conversation {data.conversation_ids[start]!r} holds utterances "
                             f"of sessions {sorted(found)} — a conversation must lie in one session")
        session[c] = found.pop()
    parts = []
    for name, sessions in (("train", fold.train), ("val", (fold.val,)), ("test", (fold.test,))):
        part = select_conversations(data, np.flatnonzero(np.isin(session, sessions)), name)
        if not (part.labels >= 0).any():
            raise UsageError(f"{_manifest(store)}: {fold.describe()}; its {name} part ({', '.join(sessions)}) has "
                             f"no labelled utterance in this store — extract every session (no --max-utterances)")
        parts.append(part)
    return tuple(parts)


def fold_problem(store: FeatureStore, fold: Fold, modalities: Sequence[str] | None = None) -> str | None:
    """The one line that refuses ``fold`` on ``store``'s features, or None: a modality whose encoder was
    fine-tuned or selected on the fold's test session, or one whose sessions the manifest does not record."""
    modalities = list(store.modalities) if modalities is None else list(modalities)
    out = store.directory.parent
    fix = (f"extract fold {fold.index}'s features with `python -m encoders_torch.extract --dataset iemocap --fold "
           f"{fold.index} --modality MODALITY ... --out {out}` (writes {out}/iemocap-fold{fold.index})")
    if unknown := [m for m in modalities if m not in store.encoders]:
        return (f"{_manifest(store)}: records no encoder sessions for {', '.join(unknown)} (manifest field "
                f"'encoders'), so {fold.describe()} cannot be shown not to leak its test session — {fix}, or "
                f"record the sessions with bridges.write_modality(..., encoder_sessions=...)")
    seen = {m: [word for key, word in (("trained_on", "fine-tuned"), ("selected_on", "selected"))
                if fold.test in store.encoders[m][key]] for m in modalities}
    if leaks := [f"{m} was {' and '.join(seen[m])} on {fold.test}" for m in modalities if seen[m]]:
        return (f"{_manifest(store)}: {fold.describe()} would leak its test session: the encoder of "
                f"{'; '.join(leaks)} — {fix}")
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
    found = {int(p.name.rpartition("-fold")[2]): p for p in root.glob(f"{dataset}-fold[0-9]*")
             if p.name.rpartition("-fold")[2].isdigit() and (p / "manifest.json").exists()}
    if not found and not (base / "manifest.json").exists():
        raise UsageError(f"{base}: no feature store, and no {root}/{dataset}-foldK — extract each fold with "
                         f"`python -m encoders_torch.extract --dataset {dataset} --fold K --out {root} ...`")
    paths = {*found.values(), *([base] if (base / "manifest.json").exists() else [])}
    opened = {path: open_store_at(path) for path in paths}
    sessions = {path: store_sessions(store) for path, store in opened.items()}
    reference = sessions[min(sessions, key=str)]
    for path, s in sessions.items():
        if s != reference:
            raise UsageError(f"{path / 'manifest.json'}: holds sessions {s}, but {min(sessions, key=str)} holds "
                             f"{reference} — every fold's store must export all sessions")
    stores = {}
    for fold in loso_folds(reference):
        path = found.get(fold.index, base)
        if path not in opened:
            raise UsageError(f"{path}: no feature store for {fold.describe()} — extract it with `python -m "
                             f"encoders_torch.extract --dataset {dataset} --fold {fold.index} --out {root} ...`")
        stores[fold.index] = opened[path]
    return stores


def _complete(run: Path, config: Config, store: FeatureStore) -> dict | None:
    """A fold's ``results.json`` when it was written for this configuration and store, else None."""
    try:
        results = json.loads((run / "results.json").read_text(encoding="utf-8"))
        stored = json.loads((run / "run_config.json").read_text(encoding="utf-8"))["store"]
    except (OSError, json.JSONDecodeError, KeyError):
        return None
    config = fit_to_store(config, store)
    want = {"model": dataclasses.asdict(config.model), "loss": dataclasses.asdict(config.loss),
            "train": dataclasses.asdict(config.train)}
    return results if results.get("config") == want and stored == str(store.directory.resolve()) else None


def train_loso(config: Config, store, workdir, *, log=None, restart: bool = False, **train_and_evaluate_kwargs) -> dict:
    """Trains every fold into ``workdir/fold_<k>`` and writes the aggregate ``results.json`` and ``report.md``;
    returns the aggregate.

    Args:
      config: the run's `Config`, the same for every fold.
      store: one store (a `bridges.FeatureStore` or its path) for every fold, or a mapping fold number →
        store (`open_fold_stores`).
      workdir: the run directory.
      restart: retrain every fold from scratch.
      train_and_evaluate_kwargs: passed on to `mister_jax.train.train_and_evaluate`.
    Raises:
      UsageError: a fold that would leak its test session (one line per fold, before any training), or
        bad input.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    as_store = lambda s: open_store_at(Path(s)) if isinstance(s, (str, Path)) else s  # noqa: E731
    given = {int(k): as_store(s) for k, s in store.items()} if isinstance(store, Mapping) else as_store(store)
    folds = loso_folds(store_sessions(next(iter(given.values())) if isinstance(given, dict) else given))
    stores = given if isinstance(given, dict) else {f.index: given for f in folds}
    if missing := [f.describe() for f in folds if f.index not in stores]:
        raise UsageError(f"no store given for {'; '.join(missing)} — pass one store per fold")
    modalities = required_modalities(config.model.variant)
    problems = [p for f in folds if (p := fold_problem(stores[f.index], f, modalities))]
    if problems:
        raise UsageError("\n".join(problems))
    workdir = Path(workdir)
    rows = []
    for fold in folds:
        run, fold_store = workdir / f"fold_{fold.index}", stores[fold.index]
        train, val, test = fold_splits(fold_store, fold, modalities)
        results = None if restart else _complete(run, config, fold_store)
        log(f"{fold.describe()} ({train.num_utterances} / {val.num_utterances} / {test.num_utterances} utterances)"
            + (f": complete in {run}, skipped" if results else f": training into {run}"))
        if results is None:
            results = train_and_evaluate(config, fold_store, run, restart=restart, log=log, splits=(train, val, test),
                                         **train_and_evaluate_kwargs)
        rows.append({"fold": fold.index, "test_session": fold.test, "val_session": fold.val,
                     "train_sessions": list(fold.train), "store": str(fold_store.directory),
                     "encoders": {m: fold_store.encoders[m] for m in modalities}, "run": f"fold_{fold.index}",
                     "utterances": {part.name: part.num_utterances for part in (train, val, test)},
                     "test": _scores(results["test"]), "val": _scores(results["val"]),
                     "best_epoch": results["best_epoch"]})
    summary = loso_results(rows, results)
    atomic.write_json(workdir / "results.json", summary)
    atomic.write_text(workdir / "report.md", loso_report(summary))
    return summary


def _scores(split: dict) -> dict:  # weighted F1 of the MoE and of each expert
    return {"weighted_f1": split["weighted_f1"], "experts": {e: v["weighted_f1"] for e, v in split["experts"].items()}}


def loso_results(rows: list[dict], last: dict) -> dict:
    """The aggregate: per fold, and weighted F1 (MoE and per expert) as mean ± std over folds × seeds."""

    def pooled(split: str, key) -> dict:  # fold-major: fold 1's seeds, then fold 2's, ...
        stats = mean_std([x for r in rows for x in key(r[split])["per_seed"]])
        return {"mean": stats["mean"], "std": stats["std"], "per_fold_seed": stats["per_seed"]}

    def overall(split: str) -> dict:
        return {"weighted_f1": pooled(split, lambda s: s["weighted_f1"]),
                "experts": {e: pooled(split, lambda s, e=e: s["experts"][e]) for e in rows[0][split]["experts"]},
                "fold_means": [r[split]["weighted_f1"]["mean"] for r in rows]}

    return {"protocol": "loso", "dataset": last["dataset"], "variant": last["variant"], "seeds": last["seeds"],
            "epochs": last["epochs"], "label_names": last["label_names"], "fold_rule": FOLD_RULE,
            "speaker_independent": True, "speaker_note": SPEAKERS, "folds": rows,
            "test": overall("test"), "val": overall("val"), "config": last["config"]}


def loso_report(summary: dict) -> str:
    """``report.md``: one row per fold, the overall row, the fold rule and the speaker independence."""
    pct = lambda s: f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}"  # noqa: E731
    experts = list(summary["test"]["experts"])
    lines = [f"# Leave-one-session-out: {summary['dataset']}, {summary['variant']}", "",
             f"{len(summary['folds'])} folds × {len(summary['seeds'])} seed(s), {summary['epochs']} epoch(s). "
             f"Weighted F1 in % (mean ± std over seeds; overall: over folds × seeds).", "",
             f"Folds: {summary['fold_rule']}. {SPEAKERS}.", "",
             "Encoder: the sessions the features' encoders were fine-tuned / selected on (all modalities).", "",
             "| fold | test | val | train | encoder | utterances (train / val / test) | val | test | "
             + " | ".join(f"test {e}" for e in experts) + " |",
             "|---|---|---|---|---|---|---|---|" + "---|" * len(experts)]
    for r in summary["folds"]:
        sizes = " / ".join(str(r["utterances"][k]) for k in ("train", "val", "test"))
        saw = [", ".join(sorted({s for e in r["encoders"].values() for s in e[k]})) or "—"
               for k in ("trained_on", "selected_on")]
        lines.append(f"| [{r['fold']}]({r['run']}/report.md) | {r['test_session']} | {r['val_session']} | "
                     f"{', '.join(r['train_sessions'])} | {' / '.join(saw)} | {sizes} | "
                     f"{pct(r['val']['weighted_f1'])} | {pct(r['test']['weighted_f1'])} | "
                     + " | ".join(pct(r["test"]["experts"][e]) for e in experts) + " |")
    t, v = summary["test"], summary["val"]
    lines.append(f"| **all** | | | | | | {pct(v['weighted_f1'])} | **{pct(t['weighted_f1'])}** | "
                 + " | ".join(pct(t["experts"][e]) for e in experts) + " |")
    return "\n".join(lines) + "\n"
