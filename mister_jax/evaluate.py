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
from matplotlib.figure import Figure

from mister_jax import atomic

from mister_jax.batching import BatchPlanner
from mister_jax.config import Config, TrainConfig
from mister_jax.errors import UsageError
from mister_jax.input_pipeline import SplitData, iterate_batches, load_split, required_modalities
from mister_jax.metrics import EXPERTS, GATE_EXPERTS, mean_std, summarize
from mister_jax.predict import open_run_and_store, predict_split, restore_best_params
from mister_jax.report import save_figure
from mister_jax.robustness import PERTURBATIONS, parse_perturbations, perturb, perturbation_name
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
        self.batches = {name: [(rows, jax.device_put(batch))
                               for rows, batch in iterate_batches(split, planner.evaluation(split.lengths))]
                        for name, split in splits.items()}

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
            scores.append(summarize(labels[labelled], {e: p[labelled] for e, p in probs.items()},
                                    None if gate is None else gate[labelled], self.label_names, detailed))
        return scores

    def intervals(self, split_name: str, per_seed: list[dict]) -> dict:
        """Bootstrap intervals over conversations of the MoE weighted F1 (`mister_jax.uncertainty`)."""
        split = self.splits[split_name]
        labelled = split.labels >= 0
        predictions = np.stack([np.argmax(p["moe"][labelled], axis=-1) for p in per_seed])
        return bootstrap_weighted_f1(split.labels[labelled], predictions, split.conversation_ids[labelled],
                                     len(self.label_names))


def improved(best: dict | None, val: dict) -> bool:
    """Model selection (DESIGN §5): whether ``val``'s MoE weighted F1 beats the best so far."""
    return best is None or val["weighted_f1"]["moe"] > best["val"]["weighted_f1"]["moe"]


def aggregate(best: list[dict], label_names: list[str], split: str) -> dict:
    """Scores of the selected epochs over seeds: mean/std/per-seed per expert, per-class and gates."""
    records = [b[split] for b in best]
    experts = {e: {"weighted_f1": mean_std([r["weighted_f1"][e] for r in records])}
               for e in EXPERTS if e in records[0]["weighted_f1"]}
    out = {"weighted_f1": experts["moe"]["weighted_f1"], "experts": experts,
           "per_class_f1": {n: float(np.mean([r["per_class_f1"][n] for r in records])) for n in label_names},
           "per_class_f1_per_seed": [r["per_class_f1"] for r in records],
           "per_expert_per_class_f1": {e: {n: float(np.mean([r["per_expert_per_class_f1"][e][n] for r in records]))
                                           for n in label_names} for e in experts},
           "confusion_matrix": np.sum([r["confusion_matrix"] for r in records], axis=0).tolist(),
           "confusion_matrix_per_seed": [r["confusion_matrix"] for r in records]}
    if "calibration" in records[0]:
        out["calibration"] = {e: pooled_reliability([r["calibration"][e] for r in records]) for e in experts}
    if "gate" in records[0]:
        out["gate"] = {
            "mean": {e: float(np.mean([r["gate"]["mean"][e] for r in records])) for e in GATE_EXPERTS},
            "std": {e: float(np.mean([r["gate"]["std"][e] for r in records])) for e in GATE_EXPERTS},
            "per_class": {n: {e: float(np.mean([r["gate"]["per_class"][n][e] for r in records
                                                if n in r["gate"]["per_class"]])) for e in GATE_EXPERTS}
                          for n in label_names if all(n in r["gate"]["per_class"] for r in records)},
            "per_seed": [r["gate"] for r in records]}
    return out


def pooled_reliability(per_seed: list[dict]) -> dict:
    """The seeds' reliability bins pooled (counts summed, means weighted by count) and their ECE as
    mean ± std over seeds."""
    count = np.sum([r["count"] for r in per_seed], axis=0).astype(np.float64)
    pooled = {name: np.divide(np.sum([np.multiply(r[name], r["count"]) for r in per_seed], axis=0), count,
                              out=np.zeros_like(count), where=count > 0).tolist() for name in ("confidence", "accuracy")}
    return {"ece": mean_std([r["ece"] for r in per_seed]), "count": count.astype(int).tolist(), **pooled}


def results_json(dataset: str, config: Config, label_names, history, best, shape_info, val_source, num_params,
                 test_interval: dict | None = None) -> dict:
    """``results.json`` (DESIGN §6): the selected epochs' scores over seeds, the run's shapes and configuration."""
    cfg = config.train
    skipped = {}
    if cfg.on_nonfinite == "skip-step":
        skipped["skipped_nonfinite_steps"] = [int(sum(h.get("skipped_nonfinite_steps", [0] * cfg.seeds)[k]
                                                      for h in history)) for k in range(cfg.seeds)]
    return {**skipped, "dataset": dataset, "variant": config.model.variant, "seeds": list(range(cfg.seeds)),
            "epochs": cfg.epochs, "label_names": list(label_names),
            "test": {**aggregate(best, label_names, "test"),
                     **({"weighted_f1_interval": test_interval} if test_interval else {})},
            "val": aggregate(best, label_names, "val"),
            "best_epoch": [b["epoch"] for b in best], "epoch_numbering": "1 = after the first pass over train",
            "val_source": val_source, "num_params": num_params,
            "train_seconds": float(sum(h["seconds"] for h in history)), **shape_info,
            "config": {"model": dataclasses.asdict(config.model), "loss": dataclasses.asdict(config.loss),
                       "train": dataclasses.asdict(config.train)}}


def robustness(run: Path, dataset: str, features: str, split: str, perturbations: list[tuple[str, float]],
               batch_size: int = 8) -> dict:
    """Every seed's best parameters on ``split`` under each perturbation (`mister_jax.robustness`): MoE
    and per-expert weighted F1 (mean ± std over seeds) and the mean gate weights β."""
    config, model_cfg, store = open_run_and_store(run, dataset, features, split)
    data = load_split(store, split, required_modalities(model_cfg.variant))
    labelled = data.labels >= 0
    if not labelled.any():
        raise UsageError(f"{store.directory / split / 'index.npz'}: no labelled utterance to score — pick a "
                         f"labelled --split")
    train_cfg, names = TrainConfig(**config["train"]), list(store.label_names)
    params = [restore_best_params(run, model_cfg, seed) for seed in range(train_cfg.seeds)]
    table = {}
    for name, sigma in perturbations:
        try:
            perturbed = perturb(data, name, sigma)
        except ValueError as err:
            raise UsageError(str(err)) from None
        per_seed = []
        for p in params:
            probs = {}
            for row, out in predict_split(p, model_cfg, perturbed, train_cfg, batch_size):
                for key, v in out.items():
                    probs.setdefault(key, np.zeros((data.num_utterances, v.shape[-1]), np.float32))[row] = v
            gate = probs.pop("gate", None)
            per_seed.append(summarize(data.labels[labelled], {e: v[labelled] for e, v in probs.items()},
                                      None if gate is None else gate[labelled], names, detailed=gate is not None))
        entry = {"experts": {e: mean_std([s["weighted_f1"][e] for s in per_seed]) for e in per_seed[0]["weighted_f1"]}}
        if "gate" in per_seed[0]:
            entry["gate_mean"] = {e: float(np.mean([s["gate"]["mean"][e] for s in per_seed])) for e in GATE_EXPERTS}
        table[perturbation_name(name, sigma)] = entry
    return {"run": str(run), "split": split, "utterances": int(labelled.sum()), "seeds": train_cfg.seeds,
            "missing_modality_input": "zeros", "perturbations": table}


def write_robustness(run: Path, result: dict) -> None:
    """``robustness.json``, ``robustness.md`` and ``robustness.png`` in the run directory."""
    rows = result["perturbations"]
    experts = [e for e in EXPERTS if e in next(iter(rows.values()))["experts"]]
    gated = all("gate_mean" in r for r in rows.values())
    lines = [f"# Robustness to a missing or degraded modality ({result['split']}, {result['utterances']} "
             f"utterances, {result['seeds']} seeds)", "",
             "Weighted F1 in % (mean ± std over seeds); a dropped modality is fed as zeros.", "",
             "| perturbation | " + " | ".join(experts) + (" | β speech | β text | β multimodal |" if gated else " |"),
             "|---|" + "---|" * (len(experts) + (3 if gated else 0))]
    for name, r in rows.items():
        cells = [f"{100 * r['experts'][e]['mean']:.1f} ± {100 * r['experts'][e]['std']:.1f}" for e in experts]
        cells += [f"{r['gate_mean'][e]:.3f}" for e in GATE_EXPERTS] if gated else []
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "![robustness](robustness.png)", ""]
    fig = Figure(figsize=(1.6 + 1.1 * len(rows), 3.4))
    ax = fig.subplots()
    width = 0.8 / len(experts)
    for i, e in enumerate(experts):
        ax.bar(np.arange(len(rows)) + i * width, [100 * r["experts"][e]["mean"] for r in rows.values()], width,
               yerr=[100 * r["experts"][e]["std"] for r in rows.values()], label=e)
    ax.set_xticks(np.arange(len(rows)) + 0.4 - width / 2, list(rows), rotation=20)
    ax.set_ylabel("weighted F1 (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, run / "robustness.png")
    atomic.write_json(run / "robustness.json", result)
    atomic.write_text(run / "robustness.md", "\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    """``python -m mister_jax.evaluate --run DIR --dataset NAME [--split test] --perturb none,drop-speech,...``"""
    parser = argparse.ArgumentParser(prog="python -m mister_jax.evaluate",
                                     description="A trained run under a missing or degraded modality.")
    parser.add_argument("--run", required=True, type=Path, help="run directory written by python -m mister_jax.train")
    parser.add_argument("--dataset", required=True, help="store name; the store is ROOT/NAME")
    parser.add_argument("--features", default="features", help="store root")
    parser.add_argument("--split", default="test")
    parser.add_argument("--perturb", default="none,drop-speech,drop-text,noise-speech=0.5,noise-text=0.5",
                        help=f"comma-separated, from {', '.join(PERTURBATIONS)} (noise-*=σ)")
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
