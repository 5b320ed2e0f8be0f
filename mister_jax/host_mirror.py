"""Host buffers, allocated once, that the seeds' device pytrees are copied into.

The training CLI keeps two of them: the training state of every seed (what a checkpoint writes) and
every seed's best-validation parameters. Each leaf is one NumPy array ``[K, ...]`` with a leading
seed axis, the layout of the checkpoint on disk whether the seeds train vmapped or one after the
other.

Why not a fresh copy each time: at paper dims the three training states are 3.4 GB, and filling
freshly allocated memory costs the page faults of every page (about 3 s per GB on the project's
2-core VMs), against 0.1 s per GB into buffers that are already mapped (docs/BENCHMARKS.md).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


class HostMirror:
    """``tree``: the pytree of ``example_one`` (one seed's leaves) with ``[K, ...]`` NumPy leaves."""

    def __init__(self, example_one: Any, num_seeds: int):
        self.tree = jax.tree_util.tree_map(lambda x: np.empty((num_seeds,) + tuple(x.shape), x.dtype), example_one)

    def put(self, k: int, tree: Any, stacked: bool = False) -> None:
        """Copies seed ``k``'s pytree (device or host arrays) into slot ``k``; ``stacked``: ``tree`` has
        the ``[K, ...]`` leaves of every seed and its slot ``k`` is copied."""
        jax.tree_util.tree_map(lambda dst, src: np.copyto(dst[k, ...], np.asarray(src)[k] if stacked else np.asarray(src)),
                               self.tree, tree)

    def put_stacked(self, stacked: Any) -> None:
        """Copies a pytree with the ``[K, ...]`` leaves of every seed."""
        jax.tree_util.tree_map(lambda dst, src: np.copyto(dst, np.asarray(src)), self.tree, stacked)

    def seed(self, k: int) -> Any:
        """Seed ``k``'s pytree as views of the buffers (valid until the next `put`)."""
        return jax.tree_util.tree_map(lambda x: x[k, ...], self.tree)
