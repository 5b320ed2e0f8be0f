"""Evaluation of a run's seeds: predictions over a split, scores, model selection and the aggregate over
seeds that `results.json` holds (DESIGN §5, §6); and a trained run under a missing or degraded
modality (`robustness`):

    python -m mister_jax.evaluate --run DIR --dataset NAME [--split test] [--features ROOT]
        --perturb none,drop-speech,drop-text,noise-speech=0.5,noise-text=0.5

writes ``robustness.md`` / ``.png`` / ``.json`` into the run: MoE and per-expert weighted F1 and the mean
gate weights β under each perturbation (`mister_jax.robustness`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Sequence

import jax
import numpy as np

from mister_jax.batching import BatchPlanner
from mister_jax.config import Config
from mister_jax.errors import UsageError
from mister_jax.input_pipeline import SplitData, iterate_batches
from mister_jax.metrics import EXPERTS, GATE_EXPERTS, mean_std, summarize
from mister_jax.robustness import PERTURBATIONS, parse_perturbations, robustness, write_robustness
from mister_jax.runtime.compile_cache import DEFAULT_CACHE, enable_compilation_cache
from mister_jax.uncertainty import bootstrap_weighted_f1


class Evaluator:
    """Scores every seed on the evaluated splits; each split's batches go to the device once.

    Args:
      seeds: the run's `mister_jax.seeds.SeedStates`.
      planner: the run's `BatchPlanner` (evaluation pad lengths).
      splits: name → `SplitData` of the evaluated splits ("val", "test").
      label_names: the class names.
    """

    def __init__(self, seeds, planner: BatchPlanner, splits: dict[str, SplitData], label_names: Sequence[str]):
        self.seeds, self.splits, self.label_names = seeds, splits, list(label_names)
        self.batches = {
            name: [
                (rows, jax.device_put(batch))
                for rows, batch in iterate_batches(split, planner.evaluation(split.lengths))
            ]
            for name, split in splits.items()
        }

    def predict(self, split_name: str, params) -> list[dict]:
        """Per seed: ``{expert: probs [N, C], "gate": [N, 3]}`` over the rows of split ``split_name``;
        ``params`` as `SeedStates.params` gives them."""
        split = self.splits[split_name]
        rows = [r for r, _ in self.batches[split_name]]
        fetched = self.seeds.predict(params, [b for _, b in self.batches[split_name]])
        per_seed = [{} for _ in self.seeds.seeds]
        for batch_rows, outs in zip(rows, fetched):
            mask = batch_rows >= 0
            for k, out in enumerate(outs):
                for name, v in out.items():
                    dest = per_seed[k].setdefault(name, np.zeros((split.num_utterances, v.shape[-1]), np.float32))
                    dest[batch_rows[mask]] = v[mask]
        return per_seed

    def score(self, split_name: str, params, detailed: bool = True) -> list[dict]:
        """Per seed, `mister_jax.metrics.summarize` of the labelled utterances of ``split_name``."""
        return self.score_predictions(split_name, self.predict(split_name, params), detailed)

    def score_predictions(self, split_name: str, per_seed: list[dict], detailed: bool = True) -> list[dict]:
        """`score` of predictions already made (`predict`'s output)."""
        labels = self.splits[split_name].labels
        labelled = labels >= 0
        scores = []
        for probs in per_seed:
            probs = dict(probs)
            gate = probs.pop("gate", None)
            scores.append(
                summarize(
                    labels[labelled],
                    {e: p[labelled] for e, p in probs.items()},
                    None if gate is None else gate[labelled],
                    self.label_names,
                    detailed,
                )
            )
        return scores

    def intervals(self, split_name: str, per_seed: list[dict]) -> dict:
        """Bootstrap intervals over conversations of the MoE weighted F1 (`mister_jax.uncertainty`)."""
        split = self.splits[split_name]
        labelled = split.labels >= 0
        predictions = np.stack([np.argmax(p["moe"][labelled], axis=-1) for p in per_seed])
        return bootstrap_weighted_f1(
            split.labels[labelled], predictions, split.conversation_ids[labelled], len(self.label_names)
        )


def improved(best: dict | None, val: dict) -> bool:
    """Model selection (DESIGN §5): whether ``val``'s MoE weighted F1 beats the best so far."""
    return best is None or val["weighted_f1"]["moe"] > best["val"]["weighted_f1"]["moe"]


def aggregate(best: list[dict], label_names: list[str], split: str) -> dict:
    """Scores of the selected epochs over seeds: mean/std/per-seed per expert, per-class and gates."""
    records = [b[split] for b in best]
    experts = {
        e: {"weighted_f1": mean_std([r["weighted_f1"][e] for r in records])}
        for e in EXPERTS
        if e in records[0]["weighted_f1"]
    }
    out = {
        "weighted_f1": experts["moe"]["weighted_f1"],
        "experts": experts,
        "per_class_f1": {n: float(np.mean([r["per_class_f1"][n] for r in records])) for n in label_names},
        "per_class_f1_per_seed": [r["per_class_f1"] for r in records],
        "per_expert_per_class_f1": {
            e: {n: float(np.mean([r["per_expert_per_class_f1"][e][n] for r in records])) for n in label_names}
            for e in experts
        },
        "confusion_matrix": np.sum([r["confusion_matrix"] for r in records], axis=0).tolist(),
        "confusion_matrix_per_seed": [r["confusion_matrix"] for r in records],
    }
    if "calibration" in records[0]:
        out["calibration"] = {e: pooled_reliability([r["calibration"][e] for r in records]) for e in experts}
    if "gate" in records[0]:
        out["gate"] = {
            "mean": {e: float(np.mean([r["gate"]["mean"][e] for r in records])) for e in GATE_EXPERTS},
            "std": {e: float(np.mean([r["gate"]["std"][e] for r in records])) for e in GATE_EXPERTS},
            "per_class": {
                n: {
                    e: float(np.mean([r["gate"]["per_class"][n][e] for r in records if n in r["gate"]["per_class"]]))
                    for e in GATE_EXPERTS
                }
                for n in label_names
                if all(n in r["gate"]["per_class"] for r in records)
            },
            "per_seed": [r["gate"] for r in records],
        }
    return out


def pooled_reliability(per_seed: list[dict]) -> dict:
    """The seeds' reliability bins pooled (counts summed, means weighted by count) and their ECE as
    mean ± std over seeds."""
    count = np.sum([r["count"] for r in per_seed], axis=0).astype(np.float64)
    pooled = {
        name: np.divide(
            np.sum([np.multiply(r[name], r["count"]) for r in per_seed], axis=0),
            count,
            out=np.zeros_like(count),
            where=count > 0,
        ).tolist()
        for name in ("confidence", "accuracy")
    }
    return {"ece": mean_std([r["ece"] for r in per_seed]), "count": count.astype(int).tolist(), **pooled}


def results_json(
    dataset: str,
    config: Config,
    label_names,
    history,
    best,
    shape_info,
    val_source,
    num_params,
    test_interval: dict | None = None,
) -> dict:
    """``results.json`` (DESIGN §6): the selected epochs' scores over seeds, the run's shapes and configuration."""
    cfg = config.train
    skipped = {}
    if cfg.on_nonfinite == "skip-step":
        skipped["skipped_nonfinite_steps"] = [
            int(sum(h.get("skipped_nonfinite_steps", [0] * cfg.seeds)[k] for h in history)) for k in range(cfg.seeds)
        ]
    return {
        **skipped,
        "dataset": dataset,
        "variant": config.model.variant,
        "seeds": list(range(cfg.seeds)),
        "epochs": cfg.epochs,
        "label_names": list(label_names),
        "test": {
            **aggregate(best, label_names, "test"),
            **({"weighted_f1_interval": test_interval} if test_interval else {}),
        },
        "val": aggregate(best, label_names, "val"),
        "best_epoch": [b["epoch"] for b in best],
        "epoch_numbering": "1 = after the first pass over train",
        "val_source": val_source,
        "num_params": num_params,
        "train_seconds": float(sum(h["seconds"] for h in history)),
        **shape_info,
        "config": {
            "model": dataclasses.asdict(config.model),
            "loss": dataclasses.asdict(config.loss),
            "train": dataclasses.asdict(config.train),
        },
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m mister_jax.evaluate --run DIR --dataset NAME [--split test] --perturb none,drop-speech,...``"""
    parser = argparse.ArgumentParser(
        prog="python -m mister_jax.evaluate", description="A trained run under a missing or degraded modality."
    )
    parser.add_argument("--run", required=True, type=Path, help="run directory written by python -m mister_jax.train")
    parser.add_argument("--dataset", required=True, help="store name; the store is ROOT/NAME")
    parser.add_argument("--features", default="features", help="store root")
    parser.add_argument("--split", default="test")
    parser.add_argument(
        "--perturb",
        default="none,drop-speech,drop-text,noise-speech=0.5,noise-text=0.5",
        help=f"comma-separated, from {', '.join(PERTURBATIONS)} (noise-*=σ)",
    )
    parser.add_argument("--jax-cache", default=os.environ.get("MISTER_JAX_CACHE", str(DEFAULT_CACHE)))
    args = parser.parse_args(argv)
    try:
        try:
            perturbations = parse_perturbations(args.perturb)
        except ValueError as err:
            raise UsageError(str(err)) from None
        enable_compilation_cache(args.jax_cache)
        result = robustness(args.run, args.dataset, args.features, args.split, perturbations)
        write_robustness(args.run, result)
    except UsageError as err:
        for line in str(err).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 2
    print((args.run / "robustness.md").read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
