"""IEMOCAP leave-one-session-out (LOSO), run: every fold of `mister_jax.folds` trained as a normal run,
then their aggregate.

    python -m mister_jax.train --dataset iemocap --protocol loso [--features ROOT] [--out DIR]

`train_loso` trains fold k into ``DIR/fold_<k>`` (`train_and_evaluate`, resumable; a complete fold is
skipped), then writes ``DIR/results.json`` (per fold, and overall mean ± std over folds × seeds) and
``DIR/report.md``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Mapping

from bridges import FeatureStore
from mister_jax import atomic
from mister_jax.config import Config
from mister_jax.errors import UsageError
from mister_jax.folds import (
    FOLD_RULE,
    SPEAKERS,
    fold_problem,
    fold_splits,
    loso_folds,
    store_sessions,
)
from mister_jax.input_pipeline import (
    fit_to_store,
    open_store_at,
    required_modalities,
)
from mister_jax.metrics import mean_std
from mister_jax.train import train_and_evaluate


def _complete(run: Path, config: Config, store: FeatureStore) -> dict | None:
    """A fold's ``results.json`` when it was written for this configuration and store, else None."""
    try:
        results = json.loads((run / "results.json").read_text(encoding="utf-8"))
        stored = json.loads((run / "run_config.json").read_text(encoding="utf-8"))["store"]
    except (OSError, json.JSONDecodeError, KeyError):
        return None
    config = fit_to_store(config, store)
    want = {
        "model": dataclasses.asdict(config.model),
        "loss": dataclasses.asdict(config.loss),
        "train": dataclasses.asdict(config.train),
    }
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
        log(
            f"{fold.describe()} ({train.num_utterances} / {val.num_utterances} / {test.num_utterances} utterances)"
            + (f": complete in {run}, skipped" if results else f": training into {run}")
        )
        if results is None:
            results = train_and_evaluate(
                config,
                fold_store,
                run,
                restart=restart,
                log=log,
                splits=(train, val, test),
                **train_and_evaluate_kwargs,
            )
        rows.append(
            {
                "fold": fold.index,
                "test_session": fold.test,
                "val_session": fold.val,
                "train_sessions": list(fold.train),
                "store": str(fold_store.directory),
                "encoders": {m: fold_store.encoders[m] for m in modalities},
                "run": f"fold_{fold.index}",
                "utterances": {part.name: part.num_utterances for part in (train, val, test)},
                "test": _scores(results["test"]),
                "val": _scores(results["val"]),
                "best_epoch": results["best_epoch"],
            }
        )
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
        return {
            "weighted_f1": pooled(split, lambda s: s["weighted_f1"]),
            "experts": {e: pooled(split, lambda s, e=e: s["experts"][e]) for e in rows[0][split]["experts"]},
            "fold_means": [r[split]["weighted_f1"]["mean"] for r in rows],
        }

    return {
        "protocol": "loso",
        "dataset": last["dataset"],
        "variant": last["variant"],
        "seeds": last["seeds"],
        "epochs": last["epochs"],
        "label_names": last["label_names"],
        "fold_rule": FOLD_RULE,
        "speaker_independent": True,
        "speaker_note": SPEAKERS,
        "folds": rows,
        "test": overall("test"),
        "val": overall("val"),
        "config": last["config"],
    }


def loso_report(summary: dict) -> str:
    """``report.md``: one row per fold, the overall row, the fold rule and the speaker independence."""
    pct = lambda s: f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}"  # noqa: E731
    experts = list(summary["test"]["experts"])
    lines = [
        f"# Leave-one-session-out: {summary['dataset']}, {summary['variant']}",
        "",
        f"{len(summary['folds'])} folds × {len(summary['seeds'])} seed(s), {summary['epochs']} epoch(s). "
        f"Weighted F1 in % (mean ± std over seeds; overall: over folds × seeds).",
        "",
        f"Folds: {summary['fold_rule']}. {SPEAKERS}.",
        "",
        "Encoder: the sessions the features' encoders were fine-tuned / selected on (all modalities).",
        "",
        "| fold | test | val | train | encoder | utterances (train / val / test) | val | test | "
        + " | ".join(f"test {e}" for e in experts)
        + " |",
        "|---|---|---|---|---|---|---|---|" + "---|" * len(experts),
    ]
    for r in summary["folds"]:
        sizes = " / ".join(str(r["utterances"][k]) for k in ("train", "val", "test"))
        saw = [
            ", ".join(sorted({s for e in r["encoders"].values() for s in e[k]})) or "—"
            for k in ("trained_on", "selected_on")
        ]
        lines.append(
            f"| [{r['fold']}]({r['run']}/report.md) | {r['test_session']} | {r['val_session']} | "
            f"{', '.join(r['train_sessions'])} | {' / '.join(saw)} | {sizes} | "
            f"{pct(r['val']['weighted_f1'])} | {pct(r['test']['weighted_f1'])} | "
            + " | ".join(pct(r["test"]["experts"][e]) for e in experts)
            + " |"
        )
    t, v = summary["test"], summary["val"]
    lines.append(
        f"| **all** | | | | | | {pct(v['weighted_f1'])} | **{pct(t['weighted_f1'])}** | "
        + " | ".join(pct(t["experts"][e]) for e in experts)
        + " |"
    )
    return "\n".join(lines) + "\n"
