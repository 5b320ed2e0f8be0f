"""Fits a trained run's temperatures on its validation split (`mister_jax.calibration`).

    python -m mister_jax.temperature --run DIR --dataset NAME [--features ROOT]

One T per seed and per head (the MoE and each expert), fitted on the validation split the run selected
its parameters on (carved from train as training carved it, when the store has none). Writes
``DIR/temperature.json`` (``{"split": "val", "per_seed": {seed: {head: T}}}``) and prints the
validation and test ECE before and after; ``python -m mister_jax.predict --temperature-scaling``
applies it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from mister_jax import atomic
from mister_jax.calibration import FILE, apply_temperature, fit_temperature
from mister_jax.config import TrainConfig
from mister_jax.errors import UsageError
from mister_jax.input_pipeline import load_splits
from mister_jax.metrics import EXPERTS, reliability
from mister_jax.predict import open_run_and_store, predict_arrays, restore_best_params
from mister_jax.runtime.compile_cache import DEFAULT_CACHE, enable_compilation_cache


def _labelled(arrays: dict, labels: np.ndarray) -> tuple[dict, np.ndarray]:
    keep = labels >= 0
    return {head: arrays[head][keep] for head in EXPERTS if head in arrays}, labels[keep]


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mister_jax.temperature", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="run directory written by python -m mister_jax.train")
    parser.add_argument("--dataset", required=True, help="the store the run was trained on; ROOT/NAME")
    parser.add_argument("--features", default="features", help="store root")
    parser.add_argument("--batch-size", type=int, default=8, help="conversations per forward pass")
    parser.add_argument(
        "--jax-cache",
        default=os.environ.get("MISTER_JAX_CACHE", str(DEFAULT_CACHE)),
        help="persistent compilation cache (default: $MISTER_JAX_CACHE or ~/.cache/mister/jax)",
    )
    return parser.parse_args(argv)


def fit_run(run: Path, dataset: str, features: str, batch_size: int = 8, log=print) -> dict:
    """Fits and writes ``run/temperature.json``; returns ``{seed: {head: {"temperature", "ece_before",
    "ece_after"} per split}}`` for the report."""
    config, model_cfg, store = open_run_and_store(run, dataset, features, "test")
    train_cfg = TrainConfig(**config["train"])
    _, val, test, _ = load_splits(store, model_cfg.variant, train_cfg, "carve", log=lambda _: None)
    temperatures, summary = {}, {}
    for seed in range(train_cfg.seeds):
        params = restore_best_params(run, model_cfg, seed)
        parts = {
            name: _labelled(predict_arrays(params, model_cfg, data, train_cfg, batch_size), data.labels)
            for name, data in (("val", val), ("test", test))
        }
        (val_probs, val_labels), (test_probs, test_labels) = parts["val"], parts["test"]
        temperatures[str(seed)] = {h: fit_temperature(p, val_labels) for h, p in val_probs.items()}
        summary[seed] = {
            head: {
                "temperature": t,
                **{
                    f"{split}_ece_{when}": reliability(p if when == "before" else apply_temperature(p, t), y)["ece"]
                    for split, (p, y) in (
                        ("val", (val_probs[head], val_labels)),
                        ("test", (test_probs[head], test_labels)),
                    )
                    for when in ("before", "after")
                },
            }
            for head, t in temperatures[str(seed)].items()
        }
    atomic.write_text(run / FILE, json.dumps({"split": "val", "per_seed": temperatures}, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        enable_compilation_cache(args.jax_cache)
        summary = fit_run(Path(args.run), args.dataset, args.features, args.batch_size)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("seed  head        T      val ECE before → after   test ECE before → after")
    for seed, heads in summary.items():
        for head, s in heads.items():
            print(
                f"{seed:>4}  {head:<10} {s['temperature']:6.3f}   {s['val_ece_before']:.4f} → {s['val_ece_after']:.4f}"
                f"          {s['test_ece_before']:.4f} → {s['test_ece_after']:.4f}"
            )
    print(f"wrote {Path(args.run) / FILE}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
