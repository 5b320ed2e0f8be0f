"""Training and evaluation of MiSTER-E on a feature store, with the paper's protocol (DESIGN §5, §6).

    from mister_jax import configs, train_and_evaluate
    results = train_and_evaluate(configs.get_config("demo"), "features/demo", "runs/demo")

Every epoch evaluates every seed on validation; each seed keeps the parameters of its best validation
weighted F1 (MoE prediction), and those parameters are scored on test once training ends. The work
directory receives ``results.json``, ``metrics.jsonl`` (one line per epoch), ``report.md`` with its
figures, ``run_config.json``, ``provenance.json`` (the encoders its features came from,
`mister_jax.provenance`) and ``checkpoints/``; calling again with the same directory resumes from
whatever it holds and ends with the scores of an uninterrupted run. The command line is
`mister_jax.main` (``python -m mister_jax.train``).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

from mister_jax import atomic, provenance
from mister_jax.checkpoint import CheckpointError, RunCheckpoints
from mister_jax.config import Config, LossConfig, ModelConfig, TrainConfig
from mister_jax.errors import UsageError
from mister_jax.evaluate import results_json
from mister_jax.input_pipeline import fit_to_store, load_splits, open_store_at, required_modalities
from mister_jax.params import count_params
from mister_jax.report import ReportError, write_report
from mister_jax.sharding import primary_process
from mister_jax.trainer import Trainer

IGNORED_ON_RESUME = ("epochs", "checkpoint_every", "checkpoint_minutes", "on_nonfinite")


def _check_same_run(workdir: Path, run_config: dict) -> None:
    """Refuses to resume a work directory that was trained with a different configuration."""
    path = workdir / "run_config.json"
    if not path.exists():
        return
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        raise UsageError(f"{path}: unreadable — delete it, or pass --restart") from None

    defaults = {
        "model": dataclasses.asdict(ModelConfig()),
        "loss": dataclasses.asdict(LossConfig()),
        "train": dataclasses.asdict(TrainConfig()),
    }

    def strip(c):  # a field added since the run was written counts at its default
        c = {**c, **{s: {**defaults[s], **c[s]} for s in defaults if isinstance(c.get(s), dict)}}
        return {**c, "train": {k: v for k, v in c.get("train", {}).items() if k not in IGNORED_ON_RESUME}}

    a, b = strip(old), strip(run_config)
    if a != b:
        diff = sorted(
            {
                f"{s}.{k}"
                for s in b
                if isinstance(b[s], dict) and isinstance(a.get(s), dict)
                for k in set(a[s]) | set(b[s])
                if a[s].get(k) != b[s].get(k)
            }
            | {s for s in b if not isinstance(b[s], dict) and a.get(s) != b[s]}
        )
        raise UsageError(
            f"{workdir}: holds a run with a different configuration ({', '.join(diff)}) — pass "
            f"--restart to discard it, or choose another --out"
        )


def train_and_evaluate(
    config: Config,
    store,
    workdir,
    *,
    dataset: str | None = None,
    seed_mode: str = "auto",
    devices: int | None = None,
    no_val: str = "carve",
    restart: bool = False,
    cache_dir: Path | None = None,
    progress: bool = False,
    log=None,
    splits: tuple | None = None,
) -> dict:
    """Trains ``config.train.seeds`` seeds on ``store`` and writes the run to ``workdir``; returns
    ``results.json``'s content.

    Args:
      config: the run's `Config` (e.g. `mister_jax.configs.get_config`); its feature dims and number of
        classes are taken from the store.
      store: a `bridges.FeatureStore` or the path of one.
      workdir: the run directory; what it holds is resumed, unless ``restart``.
      dataset: the name recorded in the results (default: the store's folder name).
      seed_mode: "auto", "vmap" or "sequential" (`mister_jax.seeds`).
      devices: devices per process (`mister_jax.sharding`; default: all). Of several processes only
        process 0 writes the run directory.
      no_val: a store without a val split: "carve" one from train or "refuse".
      cache_dir: the compilation cache (`mister_jax.runtime.compile_cache.enable_compilation_cache`).
      progress: show a progress bar.
      log: where progress lines go (default: stderr).
      splits: ``(train, val, test)`` `SplitData` to train on instead of the store's own splits (e.g. a
        leave-one-session-out fold, `mister_jax.folds`); recorded as ``val_source="given"``.
    Raises:
      UsageError: bad input, one line per problem.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    store = open_store_at(Path(store)) if isinstance(store, (str, Path)) else store
    config = fit_to_store(config, store)
    if splits is None:
        train, val, test, val_source = load_splits(store, config.model.variant, config.train, no_val, log)
    else:
        (train, val, test), val_source = splits, "given"
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    dataset = dataset or store.directory.name
    run_config = {
        "dataset": dataset,
        "store": str(store.directory.resolve()),
        "label_names": store.label_names,
        "val_source": val_source,
        "model": dataclasses.asdict(config.model),
        "loss": dataclasses.asdict(config.loss),
        "train": dataclasses.asdict(config.train),
    }
    if restart:
        if primary_process():  # the others wait for it in Trainer.restore
            shutil.rmtree(workdir / "checkpoints", ignore_errors=True)
            (workdir / "run_config.json").unlink(missing_ok=True)
    else:
        _check_same_run(workdir, run_config)

    trainer = Trainer(config, store.label_names, train, val, test, workdir, seed_mode, log, cache_dir, devices)
    try:
        ckpt = RunCheckpoints(workdir / "checkpoints")
        try:
            start = trainer.restore(ckpt)
            if trainer.primary:
                atomic.write_json(workdir / "run_config.json", run_config)  # a refused resume leaves it as it was
                provenance.write(workdir, store, required_modalities(config.model.variant))
            trainer.fit(ckpt, start, progress)
            trainer.finish(ckpt)
        finally:
            ckpt.close()
    except CheckpointError as err:
        raise UsageError(str(err)) from None
    results = results_json(
        dataset,
        config,
        store.label_names,
        trainer.history,
        trainer.best,
        trainer.shape_info,
        val_source,
        count_params(trainer.best_params.seed(0)),
        trainer.test_interval,
    )
    if not trainer.primary:
        return results
    atomic.write_json(workdir / "results.json", results)
    try:
        write_report(workdir, results, trainer.history)
    except ReportError as err:
        raise UsageError(
            f"{err}; results.json and metrics.jsonl are complete — free the space and rerun the same "
            f"command to write the report"
        ) from None
    return results


if __name__ == "__main__":
    from mister_jax.main import main

    sys.exit(main())
