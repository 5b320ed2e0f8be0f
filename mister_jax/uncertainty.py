"""Uncertainty of weighted F1: bootstrap confidence intervals and a paired test, resampling whole
conversations (Efron & Tibshirani, 1993, ch. 13 and 16).

Utterances of one conversation are not independent (emotions persist along a dialogue), so the unit
resampled is the conversation: each draw takes M conversations of the test split with replacement and
scores every utterance of those taken. A draw is a vector of counts ``[M]`` (how often each
conversation was taken), so the confusion matrix of a draw is ``counts @ per-conversation confusions``
and a thousand draws cost one matmul.

Shapes: ``labels``, ``predictions`` ``int [N]`` over the labelled utterances; ``conversations`` ``[N]``
any hashable ids (the conversation of each utterance); ``per_seed`` predictions ``int [K, N]``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

DRAWS = 1000
LEVEL = 0.95


def weighted_f1_from_confusion(confusion: np.ndarray) -> np.ndarray:
    """Support-weighted F1 of confusion matrices ``[..., C, C]`` (rows = true class), as
    `sklearn.metrics.f1_score(average="weighted", zero_division=0)` computes it; returns ``[...]``."""
    confusion = np.asarray(confusion, np.float64)
    true_positive = np.diagonal(confusion, axis1=-2, axis2=-1)
    support = confusion.sum(axis=-1)  # [..., C] true counts
    predicted = confusion.sum(axis=-2)  # [..., C]
    denominator = support + predicted
    f1 = np.divide(2 * true_positive, denominator, out=np.zeros_like(true_positive), where=denominator > 0)
    total = support.sum(axis=-1)
    return np.divide((f1 * support).sum(axis=-1), total, out=np.zeros_like(total), where=total > 0)


def conversation_confusions(
    labels: np.ndarray, predictions: np.ndarray, conversations: np.ndarray, num_classes: int
) -> np.ndarray:
    """Per-conversation confusion matrices ``[..., M, C·C]`` for predictions ``[..., N]``, conversations in
    order of first appearance."""
    _, first, group = np.unique(np.asarray(conversations), return_index=True, return_inverse=True)
    order = np.argsort(np.argsort(first))  # rank of each conversation by first appearance
    group = order[group.reshape(-1)]
    cell = np.asarray(labels) * num_classes + np.asarray(predictions)  # [..., N]
    flat = group * num_classes * num_classes + cell  # [..., N] index into [M, C·C]
    size = len(first) * num_classes * num_classes
    counts = np.stack([np.bincount(f, minlength=size) for f in flat.reshape(-1, flat.shape[-1])])
    return counts.reshape(cell.shape[:-1] + (len(first), num_classes * num_classes)).astype(np.float64)


def draw_counts(num_conversations: int, draws: int = DRAWS, seed: int = 0) -> np.ndarray:
    """``[draws, M]``: how often each conversation is taken by each bootstrap draw."""
    rng = np.random.default_rng(seed)
    taken = rng.integers(0, num_conversations, (draws, num_conversations))
    return np.stack([np.bincount(t, minlength=num_conversations) for t in taken]).astype(np.float64)


def _interval(samples: np.ndarray, level: float) -> tuple[float, float]:
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(samples, [tail, 100 - tail])
    return float(low), float(high)


def _draw_scores(labels, predictions, conversations, num_classes: int, draws: int, seed: int) -> np.ndarray:
    """Weighted F1 ``[K, R]`` of each row of ``predictions [K, N]`` on every draw of conversations."""
    confusions = conversation_confusions(labels, predictions, conversations, num_classes)  # [K, M, C·C]
    counts = draw_counts(confusions.shape[1], draws, seed)  # [R, M]
    shape = (draws, num_classes, num_classes)
    return np.stack([weighted_f1_from_confusion((counts @ c).reshape(shape)) for c in confusions])


def bootstrap_weighted_f1(
    labels: np.ndarray,
    per_seed: np.ndarray,
    conversations: np.ndarray,
    num_classes: int,
    draws: int = DRAWS,
    level: float = LEVEL,
    seed: int = 0,
) -> dict:
    """Percentile bootstrap intervals of weighted F1, per seed and of the mean over seeds.

    Every seed is scored on the same draws, so the pooled interval is that of the seeds' mean F1 when the
    test conversations are resampled.

    Args:
      labels: ``[N]`` true classes; per_seed: ``[K, N]`` predicted classes; conversations: ``[N]``.
    Returns:
      ``{"level", "draws", "unit": "conversation", "per_seed": [{"low", "high"}] * K,
      "pooled": {"low", "high"}}``.
    """
    scores = _draw_scores(labels, np.atleast_2d(per_seed), conversations, num_classes, draws, seed)  # [K, R]
    per = [dict(zip(("low", "high"), _interval(s, level))) for s in scores]
    pooled = dict(zip(("low", "high"), _interval(scores.mean(axis=0), level)))
    return {"level": level, "draws": draws, "unit": "conversation", "per_seed": per, "pooled": pooled}


def paired_bootstrap(
    labels: np.ndarray,
    per_seed_a: np.ndarray,
    per_seed_b: np.ndarray,
    conversations: np.ndarray,
    num_classes: int,
    draws: int = DRAWS,
    level: float = LEVEL,
    seed: int = 0,
) -> dict:
    """Difference of mean weighted F1 over seeds, A − B, on the same test utterances, with its paired
    bootstrap interval and a two-sided p-value.

    Both systems are scored on the same resampled conversations in every draw (pairing over
    conversations); seed k of A is paired with seed k of B (both need K seeds). The p-value is twice the
    smaller share of draws on either side of zero (with one draw added to each count), the usual
    percentile-bootstrap test of "no difference".
    """
    per_seed_a, per_seed_b = np.atleast_2d(per_seed_a), np.atleast_2d(per_seed_b)
    if per_seed_a.shape != per_seed_b.shape:
        raise ValueError(f"paired seeds need the same shape, got {per_seed_a.shape} and {per_seed_b.shape}")
    both = np.concatenate([per_seed_a, per_seed_b])
    confusions = conversation_confusions(labels, both, conversations, num_classes)  # [2K, M, C·C]
    scores = _draw_scores(labels, both, conversations, num_classes, draws, seed)  # [2K, R]
    k = per_seed_a.shape[0]
    difference = scores[:k].mean(axis=0) - scores[k:].mean(axis=0)  # [R]
    observed = float(
        np.mean([weighted_f1_from_confusion(c.sum(axis=0).reshape(num_classes, num_classes)) for c in confusions[:k]])
        - np.mean([weighted_f1_from_confusion(c.sum(axis=0).reshape(num_classes, num_classes)) for c in confusions[k:]])
    )
    below, above = (np.sum(difference <= 0) + 1) / (draws + 1), (np.sum(difference >= 0) + 1) / (draws + 1)
    low, high = _interval(difference, level)
    return {
        "difference": observed,
        "low": low,
        "high": high,
        "p_value": float(min(1.0, 2 * min(below, above))),
        "level": level,
        "draws": draws,
        "unit": "conversation",
        "seeds_paired": k,
    }


def first_difference(ids_a: Sequence[str], ids_b: Sequence[str]) -> str | None:
    """The first position where two lists of utterance ids differ, described in words; None if equal."""
    for i, (a, b) in enumerate(zip(ids_a, ids_b)):
        if a != b:
            return f"utterance {i}: {a!r} against {b!r}"
    if len(ids_a) != len(ids_b):
        return f"{len(ids_a)} against {len(ids_b)} utterances (the first {min(len(ids_a), len(ids_b))} agree)"
    return None
