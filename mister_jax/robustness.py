"""A missing or degraded modality at test time, and the training-time modality dropout that prepares a
model for it.

What a missing modality feeds the model: zeros, the value the model already gives padded utterances
(inputs are zeroed at padding before any layer), so "absent" and "padding" look alike to every
layer, and no statistic of the training data is needed at test time. Perturbations (``--perturb``):

  none               the features as they are
  drop-speech        speech features replaced by zeros (text likewise with drop-text)
  noise-speech=σ     speech features plus Gaussian noise of σ times each dimension's standard
                     deviation over the split (text likewise), drawn with a fixed seed

Training-time modality dropout (``--set modality_dropout=p``) prepares a model for it
(`mister_jax.augmentation.apply_modality_dropout`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from mister_jax import atomic
from mister_jax.config import TrainConfig
from mister_jax.errors import UsageError
from mister_jax.input_pipeline import SplitData, load_split, required_modalities
from mister_jax.metrics import EXPERTS, GATE_EXPERTS, mean_std, summarize
from mister_jax.predict import open_run_and_store, predict_arrays, restore_best_params
from mister_jax.report import save_figure

PERTURBATIONS = ("none", "drop-speech", "drop-text", "noise-speech", "noise-text")
NOISE_SEED = 0


def parse_perturbations(text: str) -> list[tuple[str, float]]:
    """``"none,drop-speech,noise-text=0.5"`` → ``[("none", 0.0), ("drop-speech", 0.0), ("noise-text", 0.5)]``."""
    parsed = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        name, _, value = item.partition("=")
        if name not in PERTURBATIONS:
            raise ValueError(f"--perturb {item}: unknown; choose from {', '.join(PERTURBATIONS)} (noise-*=σ)")
        if name.startswith("noise"):
            try:
                sigma = float(value)
            except ValueError:
                raise ValueError(f"--perturb {item}: expected {name}=σ with σ a number, e.g. {name}=0.5") from None
            if sigma < 0:
                raise ValueError(f"--perturb {item}: σ must be >= 0")
            parsed.append((name, sigma))
        elif value:
            raise ValueError(f"--perturb {item}: {name} takes no value")
        else:
            parsed.append((name, 0.0))
    return parsed


def perturbation_name(name: str, sigma: float) -> str:
    return f"{name}={sigma:g}" if name.startswith("noise") else name


def perturb(data: SplitData, name: str, sigma: float = 0.0) -> SplitData:
    """``data`` with one modality dropped or noised (see the module docstring); the other modality,
    the labels and the conversations are the same arrays."""
    if name == "none":
        return data
    action, modality = name.split("-")
    if modality not in data.features:
        raise ValueError(f"--perturb {name}: the run does not read the {modality} modality")
    x = data.features[modality]  # [N, D]
    if action == "drop":
        changed = np.zeros_like(x)
    else:
        noise = np.random.default_rng(NOISE_SEED).standard_normal(x.shape).astype(x.dtype)
        changed = x + sigma * x.std(axis=0, keepdims=True) * noise
    return dataclasses.replace(data, features={**data.features, modality: changed})


def robustness(
    run: Path, dataset: str, features: str, split: str, perturbations: list[tuple[str, float]], batch_size: int = 8
) -> dict:
    """Every seed's best parameters on ``split`` under each perturbation (`mister_jax.robustness`): MoE
    and per-expert weighted F1 (mean ± std over seeds) and the mean gate weights β."""
    config, model_cfg, store = open_run_and_store(run, dataset, features, split)
    data = load_split(store, split, required_modalities(model_cfg.variant))
    labelled = data.labels >= 0
    if not labelled.any():
        raise UsageError(
            f"{store.directory / split / 'index.npz'}: no labelled utterance to score — pick a labelled --split"
        )
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
            probs = predict_arrays(p, model_cfg, perturbed, train_cfg, batch_size)
            gate = probs.pop("gate", None)
            per_seed.append(
                summarize(
                    data.labels[labelled],
                    {e: v[labelled] for e, v in probs.items()},
                    None if gate is None else gate[labelled],
                    names,
                    detailed=gate is not None,
                )
            )
        entry = {"experts": {e: mean_std([s["weighted_f1"][e] for s in per_seed]) for e in per_seed[0]["weighted_f1"]}}
        if "gate" in per_seed[0]:
            entry["gate_mean"] = {e: float(np.mean([s["gate"]["mean"][e] for s in per_seed])) for e in GATE_EXPERTS}
        table[perturbation_name(name, sigma)] = entry
    return {
        "run": str(run),
        "split": split,
        "utterances": int(labelled.sum()),
        "seeds": train_cfg.seeds,
        "missing_modality_input": "zeros",
        "perturbations": table,
    }


def write_robustness(run: Path, result: dict) -> None:
    """``robustness.json``, ``robustness.md`` and ``robustness.png`` in the run directory."""
    rows = result["perturbations"]
    experts = [e for e in EXPERTS if e in next(iter(rows.values()))["experts"]]
    gated = all("gate_mean" in r for r in rows.values())
    lines = [
        f"# Robustness to a missing or degraded modality ({result['split']}, {result['utterances']} "
        f"utterances, {result['seeds']} seeds)",
        "",
        "Weighted F1 in % (mean ± std over seeds); a dropped modality is fed as zeros.",
        "",
        "| perturbation | " + " | ".join(experts) + (" | β speech | β text | β multimodal |" if gated else " |"),
        "|---|" + "---|" * (len(experts) + (3 if gated else 0)),
    ]
    for name, r in rows.items():
        cells = [f"{100 * r['experts'][e]['mean']:.1f} ± {100 * r['experts'][e]['std']:.1f}" for e in experts]
        cells += [f"{r['gate_mean'][e]:.3f}" for e in GATE_EXPERTS] if gated else []
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "![robustness](robustness.png)", ""]
    fig = Figure(figsize=(1.6 + 1.1 * len(rows), 3.4))
    ax = fig.subplots()
    width = 0.8 / len(experts)
    for i, e in enumerate(experts):
        ax.bar(
            np.arange(len(rows)) + i * width,
            [100 * r["experts"][e]["mean"] for r in rows.values()],
            width,
            yerr=[100 * r["experts"][e]["std"] for r in rows.values()],
            label=e,
        )
    ax.set_xticks(np.arange(len(rows)) + 0.4 - width / 2, list(rows), rotation=20)
    ax.set_ylabel("weighted F1 (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, run / "robustness.png")
    atomic.write_json(run / "robustness.json", result)
    atomic.write_text(run / "robustness.md", "\n".join(lines))
