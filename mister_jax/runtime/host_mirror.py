"""Host buffers, allocated once, that the seeds' device pytrees are copied into.

The training CLI keeps two of them: the training state of every seed (what a checkpoint writes) and
every seed's best-validation parameters. Each leaf is one NumPy array ``[K, ...]`` with a leading
seed axis, the layout of the checkpoint on disk whether the seeds train vmapped or one after the
other.

Why not a fresh copy each time: at paper dims the three training states take gigabytes, and filling
freshly allocated memory costs the page fault of every page, far more than copying into buffers that
are already mapped (docs/BENCHMARKS.md measures both).

All leaves are views into one page-aligned buffer (``buffer``), each starting on a 4 KiB boundary,
so a checkpoint writes the buffer as it is, with direct I/O (`mister_jax.runtime.direct_io`).
"""

from __future__ import annotations

import math
import mmap
from typing import Any

import jax
import numpy as np

ALIGNMENT = 4096  # bytes: direct I/O's alignment of memory, file offsets and sizes


class HostMirror:
    """``tree``: the pytree of ``example_one`` (one seed's leaves) with ``[K, ...]`` NumPy leaves.

    ``buffer`` (uint8, a multiple of `ALIGNMENT` bytes) holds every leaf; ``layout`` lists each leaf's
    path, dtype, shape and byte offset in it, which identifies the pytree a saved buffer belongs to.
    """

    def __init__(self, example_one: Any, num_seeds: int):
        leaves, treedef = jax.tree_util.tree_flatten_with_path(example_one)
        self.layout, size = [], 0
        for path, x in leaves:
            dtype, shape = np.dtype(x.dtype), (num_seeds,) + tuple(x.shape)
            self.layout.append(
                {"path": jax.tree_util.keystr(path), "dtype": dtype.str, "shape": list(shape), "offset": size}
            )
            size += -(-math.prod(shape) * dtype.itemsize // ALIGNMENT) * ALIGNMENT
        self._memory = mmap.mmap(-1, max(size, ALIGNMENT))  # anonymous, page-aligned
        self.buffer = np.frombuffer(self._memory, np.uint8)
        views = [
            self.buffer[e["offset"] : e["offset"] + math.prod(e["shape"]) * np.dtype(e["dtype"]).itemsize]
            .view(e["dtype"])
            .reshape(e["shape"])
            for e in self.layout
        ]
        self.tree = jax.tree_util.tree_unflatten(treedef, views)

    def put(self, k: int, tree: Any, stacked: bool = False) -> None:
        """Copies seed ``k``'s pytree (device or host arrays) into slot ``k``; ``stacked``: ``tree`` has
        the ``[K, ...]`` leaves of every seed and its slot ``k`` is copied."""
        jax.tree_util.tree_map(
            lambda dst, src: np.copyto(dst[k, ...], np.asarray(src)[k] if stacked else np.asarray(src)), self.tree, tree
        )

    def put_stacked(self, stacked: Any) -> None:
        """Copies a pytree with the ``[K, ...]`` leaves of every seed."""
        jax.tree_util.tree_map(lambda dst, src: np.copyto(dst, np.asarray(src)), self.tree, stacked)

    def seed(self, k: int) -> Any:
        """Seed ``k``'s pytree as views of the buffers (valid until the next `put`)."""
        return jax.tree_util.tree_map(lambda x: x[k, ...], self.tree)
