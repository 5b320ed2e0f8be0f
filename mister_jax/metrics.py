"""Evaluation metrics (DESIGN §5): weighted F1 per expert, per-class F1, confusion matrix, gate β.

F1 scores and confusion matrices come from scikit-learn (``zero_division=0``: a class neither present
nor predicted scores 0).

All functions take flat arrays over the real, labelled utterances of a split: ``labels [N]`` and
probabilities ``[N, C]``; ``gate [N, 3]`` holds (β^s, β^t, β^m) of Eq. 11.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from sklearn.metrics import confusion_matrix, f1_score

EXPERTS = ("speech", "text", "multimodal", "moe")
GATE_EXPERTS = ("speech", "text", "multimodal")
CALIBRATION_BINS = 15


def confusion(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """``int [C, C]`` counts, rows = true class, columns = predicted class."""
    return confusion_matrix(labels, predictions, labels=np.arange(num_classes))


def weighted_f1(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> float:
    """Support-weighted mean of per-class F1, a fraction in [0, 1] (0.0 for an empty split)."""
    if len(labels) == 0:
        return 0.0
    return float(f1_score(labels, predictions, labels=np.arange(num_classes), average="weighted", zero_division=0))


def per_class_f1(labels: np.ndarray, predictions: np.ndarray, label_names: Sequence[str]) -> dict:
    """``{label_name: F1}`` for every class (0.0 for a class neither present nor predicted)."""
    scores = f1_score(labels, predictions, labels=np.arange(len(label_names)), average=None, zero_division=0)
    return {name: float(s) for name, s in zip(label_names, scores)}


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = CALIBRATION_BINS) -> dict:
    """Calibration of ``probs [N, C]`` (Guo et al., 2017): utterances binned by confidence (the top
    probability) into ``bins`` equal-width bins; per bin the count, the mean confidence and the accuracy,
    and the expected calibration error ECE = Σ_b (n_b / N) |accuracy_b − confidence_b|."""
    confidence = np.clip(np.nan_to_num(probs.max(axis=-1), nan=0.0), 0.0, 1.0)  # a diverged run's NaNs: bin 0
    correct = (probs.argmax(axis=-1) == labels).astype(np.float64)
    which = np.minimum(
        (confidence * bins).astype(np.int64), bins - 1
    )  # bin b holds [b/bins, (b+1)/bins); the last also 1
    count = np.bincount(which, minlength=bins).astype(np.float64)
    mean_confidence = np.divide(np.bincount(which, confidence, bins), count, out=np.zeros(bins), where=count > 0)
    accuracy = np.divide(np.bincount(which, correct, bins), count, out=np.zeros(bins), where=count > 0)
    ece = float(np.sum(count * np.abs(accuracy - mean_confidence)) / max(count.sum(), 1.0))
    return {
        "ece": ece,
        "count": count.astype(int).tolist(),
        "confidence": mean_confidence.tolist(),
        "accuracy": accuracy.tolist(),
    }


def gate_statistics(gate: np.ndarray, labels: np.ndarray, label_names: Sequence[str]) -> dict:
    """Mean/std of β per expert over all utterances and the mean β per expert for each true class."""
    stats = {
        "mean": {e: float(gate[:, i].mean()) for i, e in enumerate(GATE_EXPERTS)},
        "std": {e: float(gate[:, i].std()) for i, e in enumerate(GATE_EXPERTS)},
        "per_class": {},
    }
    for c, name in enumerate(label_names):
        rows = gate[labels == c]
        if len(rows):
            stats["per_class"][name] = {e: float(rows[:, i].mean()) for i, e in enumerate(GATE_EXPERTS)}
    return stats


def summarize(
    labels: np.ndarray,
    probs: Mapping[str, np.ndarray],
    gate: np.ndarray | None,
    label_names: Sequence[str],
    detailed: bool,
) -> dict:
    """Scores of one model on one split.

    Args:
      labels: ``int [N]`` true classes of the labelled utterances.
      probs: expert name (``speech``, ``text``, ``multimodal``, ``moe``) → ``[N, C]``; experts the
        variant lacks are absent.
      gate: ``[N, 3]`` or ``None``.
      detailed: add per-class F1, the confusion matrix (rows = true class), calibration (`reliability`)
        and gate statistics.
    Returns:
      ``{"weighted_f1": {expert: f1}, ...}``.
    """
    c = len(label_names)
    preds = {e: np.argmax(p, axis=-1) for e, p in probs.items()}
    out = {"weighted_f1": {e: weighted_f1(labels, preds[e], c) for e in EXPERTS if e in preds}}
    if detailed:
        out["per_class_f1"] = per_class_f1(labels, preds["moe"], label_names)
        out["confusion_matrix"] = confusion(labels, preds["moe"], c).tolist()
        out["per_expert_per_class_f1"] = {e: per_class_f1(labels, preds[e], label_names) for e in EXPERTS if e in preds}
        out["calibration"] = {e: reliability(probs[e], labels) for e in EXPERTS if e in probs}
        if gate is not None:
            out["gate"] = gate_statistics(gate, labels, label_names)
    return out


def mean_std(values: Sequence[float]) -> dict:
    """``{"mean", "std", "per_seed"}`` (population std, as numpy; 0.0 for one seed)."""
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std()), "per_seed": [float(x) for x in v]}
