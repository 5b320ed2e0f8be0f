"""Pad lengths: at most K lengths that the batches of a split are padded to, chosen to waste the least
padding (each length compiles one training program; `mister_jax.batching` makes the plans)."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def bucket_lengths(lengths: Sequence[int], num_buckets: int, multiple: int = 8) -> tuple[int, ...]:
    """At most ``num_buckets`` pad lengths (multiples of ``multiple``) minimising total padding.

    Exact dynamic programme over the distinct rounded-up lengths: the pad length of a bucket is its
    largest member, every conversation goes to the smallest pad length that holds it.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size == 0:
        return (multiple,)
    rounded = -(-lengths // multiple) * multiple
    values, counts = np.unique(rounded, return_counts=True)
    real = np.bincount(np.searchsorted(values, rounded), weights=lengths, minlength=len(values))
    u, k = len(values), min(num_buckets, len(values))
    cum_count = np.concatenate([[0], np.cumsum(counts)])
    cum_real = np.concatenate([[0.0], np.cumsum(real)])

    def waste(i: int, j: int) -> float:  # values[i..j] padded to values[j]
        return values[j] * (cum_count[j + 1] - cum_count[i]) - (cum_real[j + 1] - cum_real[i])

    cost = np.full((k + 1, u), np.inf)
    choice = np.zeros((k + 1, u), dtype=np.int64)
    for j in range(u):
        cost[1, j] = waste(0, j)
    for b in range(2, k + 1):
        for j in range(u):
            for i in range(1, j + 1):
                c = cost[b - 1, i - 1] + waste(i, j)
                if c < cost[b, j]:
                    cost[b, j], choice[b, j] = c, i
    best_b = int(np.argmin(cost[1:, u - 1])) + 1
    pads, j, b = [], u - 1, best_b
    while b >= 1:
        pads.append(int(values[j]))
        j, b = (choice[b, j] - 1, b - 1) if b > 1 else (-1, 0)
    return tuple(sorted(pads))


def assign_buckets(lengths: np.ndarray, pad_lengths: Sequence[int]) -> np.ndarray:
    """Index into ``pad_lengths`` of the smallest pad length holding each conversation ``[M]``."""
    idx = np.searchsorted(np.asarray(pad_lengths), np.asarray(lengths), side="left")
    if np.any(idx >= len(pad_lengths)):
        raise ValueError(f"a conversation is longer than the largest pad length {max(pad_lengths)}")
    return idx
