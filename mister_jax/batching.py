"""Batch plans: which conversations form each batch and the length it is padded to (DESIGN §3 "Batches").

A batch holds ``B`` whole conversations padded to one length ``T`` taken from a small, fixed set of pad
lengths (the *buckets*, at most ``num_buckets``), so a jitted step compiles once per bucket. Four ways
to form the batches of a training epoch (``TrainConfig.batching``):

- ``sorted`` (default): conversations sorted by length, longest first, cut into consecutive batches
  of ``B``; each batch is padded to the smallest pad length holding its longest conversation, and the
  pad lengths are chosen on those batch maxima. Least padding. Training breaks ties between equal
  lengths at random per ``(seed, epoch)`` and shuffles the order of the batches per epoch; batches
  of different lengths never mix, so the composition of batches changes little between epochs.
- ``shuffled``: conversations shuffled per ``(seed, epoch)`` within their bucket (the pad length
  holding them), then cut into batches of ``B``; the order of the batches is shuffled per epoch.
  Random composition within a bucket only.
- ``random``: the authors' batching (a shuffled DataLoader): all conversations shuffled per
  ``(seed, epoch)`` and cut into batches of ``B``, each padded to the smallest pad length holding its
  longest conversation. Composition and order random per seed and per epoch; the most padding. The
  reference for learning-curve comparisons.
- ``bucketed``: ``random`` with little padding: conversations shuffled per ``(seed, epoch)``, cut into
  pools of ``pool_batches · B``, each pool sorted by length and cut into batches of ``B``. Batches
  are random per seed and epoch but hold conversations of similar lengths. (``random`` is
  ``bucketed`` with pools of one batch; one pool of the whole split batches as ``sorted`` does.)
  ``benchmarks/batching.py`` measures padding against randomness for each, and chose the default.

For ``random`` and ``bucketed`` the pad lengths are chosen on the longest conversation of each batch
over `_PAD_DRAWS` draws, the same for every seed; every draw holds the longest conversation, so every
batch fits. A seed's batches are ranked by pad length and the ranks are visited in an order drawn per
epoch (the same for every seed): each seed's order is still uniformly random, and step ``i`` of every
seed needs nearly the same pad length. Vmapped seeds need one shape per step: `align_steps` pads
step ``i`` of every seed to the largest of the seeds' (the same conversations in the same order, more
padding; dropout masks, drawn for the padded shape, then depend on the other seeds). Interleaved
seeds keep their own pad lengths.

Every plan is a pure function of ``(seed, epoch)`` and has ``ceil(M / B)`` batches for every seed, so
a run resumed at an epoch replays exactly the batches an uninterrupted run sees. Plans without a seed
(evaluation, prediction) keep the batches in their natural order, length-sorted for ``random`` and
``bucketed``.

This module is the one place pad lengths and plans are made (`BatchPlanner`); training, evaluation,
prediction and the benchmarks all take them from here.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from mister_jax.buckets import assign_buckets, bucket_lengths

BATCHING = ("sorted", "shuffled", "random", "bucketed")
_PAD_DRAWS = 16  # draws of random batches on which their pad lengths are chosen


@dataclasses.dataclass(frozen=True)
class PlannedBatch:
    """``conversations [B]`` (indices into the split, ``-1`` = empty slot) padded to ``length``."""

    length: int
    conversations: np.ndarray


def sorted_batch_maxima(lengths: Sequence[int], batch_size: int) -> np.ndarray:
    """The longest conversation of each ``sorted`` batch (lengths sorted longest first, cut by ``B``)."""
    return np.sort(np.asarray(lengths, dtype=np.int64))[::-1][::batch_size]


def pooled_batches(
    lengths: np.ndarray, batch_size: int, pool_batches: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Conversation indices of random batches: shuffled, cut into pools of ``pool_batches · B``, each
    pool sorted by length (longest first) and cut into batches of ``B`` (the last may be shorter)."""
    order = rng.permutation(len(lengths))
    pool = pool_batches * batch_size
    batches = []
    for start in range(0, len(order), pool):
        members = order[start : start + pool]
        members = members[np.argsort(-lengths[members], kind="stable")]
        batches += [members[i : i + batch_size] for i in range(0, len(members), batch_size)]
    return batches


def choose_pad_lengths(
    split_lengths: Sequence[np.ndarray],
    batch_size: int,
    num_buckets: int,
    multiple: int,
    batching: str = "sorted",
    pool_batches: int = 8,
) -> tuple[int, ...]:
    """The pad lengths shared by the batches of several splits (train, val, test).

    The least padding of: ``sorted``, the splits' sorted batch maxima; ``shuffled``, every
    conversation; ``random`` / ``bucketed``, the batch maxima of `_PAD_DRAWS` draws of their batches.
    """
    if batching not in BATCHING:
        raise ValueError(f"batching={batching!r} is not one of {BATCHING}")
    if batching == "sorted":
        split_lengths = [sorted_batch_maxima(lengths, batch_size) for lengths in split_lengths]
    elif batching in ("random", "bucketed"):
        pool = 1 if batching == "random" else pool_batches
        split_lengths = [np.asarray(lengths, np.int64) for lengths in split_lengths]
        split_lengths = [
            [lengths[b].max() for b in pooled_batches(lengths, batch_size, pool, np.random.default_rng([draw]))]
            for lengths in split_lengths
            for draw in range(_PAD_DRAWS)
        ]
    return bucket_lengths(np.concatenate([np.asarray(x, dtype=np.int64) for x in split_lengths]), num_buckets, multiple)


def _chunk(conversations: np.ndarray, length: int, batch_size: int) -> list[PlannedBatch]:
    chunks = []
    for i in range(0, len(conversations), batch_size):
        conv = np.full(batch_size, -1, dtype=np.int64)
        conv[: len(conversations[i : i + batch_size])] = conversations[i : i + batch_size]
        chunks.append(PlannedBatch(int(length), conv))
    return chunks


def _sorted_batches(
    lengths: np.ndarray, pad_lengths: Sequence[int], batch_size: int, tie_break: np.ndarray
) -> list[PlannedBatch]:
    order = np.lexsort((tie_break, -lengths))
    chunks = []
    for i in range(0, len(order), batch_size):
        members = order[i : i + batch_size]
        pad = pad_lengths[int(assign_buckets(lengths[members[:1]], pad_lengths)[0])]
        chunks.extend(_chunk(members, pad, batch_size))
    return chunks


def _shuffled_batches(
    lengths: np.ndarray, pad_lengths: Sequence[int], batch_size: int, content_rng: np.random.Generator | None
) -> list[PlannedBatch]:
    bucket = assign_buckets(lengths, pad_lengths)
    chunks = []
    for b, pad in enumerate(pad_lengths):
        members = np.flatnonzero(bucket == b)
        if content_rng is not None:
            members = members[content_rng.permutation(len(members))]
        chunks.extend(_chunk(members, pad, batch_size))
    return chunks


def epoch_plan(
    lengths: np.ndarray,
    pad_lengths: Sequence[int],
    batch_size: int,
    *,
    seed: int | None,
    epoch: int,
    batching: str = "sorted",
    pool_batches: int = 8,
) -> list[PlannedBatch]:
    """The batches of one epoch (see the module docstring); pure function of ``(seed, epoch)``.

    ``seed=None`` (evaluation, prediction) keeps the batches in their natural order and breaks ties by
    store order (``random`` and ``bucketed`` then batch as ``sorted`` does). Otherwise the contents are
    randomised with ``default_rng([seed, epoch])`` and the order of the batches with
    ``default_rng([epoch])``: for ``sorted`` and ``shuffled`` the shape sequence is the same for every
    seed, for ``random`` and ``bucketed`` nearly so (see `align_steps`).
    """
    if batching not in BATCHING:
        raise ValueError(f"batching={batching!r} is not one of {BATCHING}")
    lengths = np.asarray(lengths, dtype=np.int64)
    content_rng = None if seed is None else np.random.default_rng([seed, epoch])
    if batching == "shuffled":
        chunks = _shuffled_batches(lengths, pad_lengths, batch_size, content_rng)
    elif batching == "sorted" or content_rng is None:
        tie_break = np.arange(len(lengths)) if content_rng is None else content_rng.permutation(len(lengths))
        chunks = _sorted_batches(lengths, pad_lengths, batch_size, tie_break)
    else:
        pool = 1 if batching == "random" else pool_batches
        members = pooled_batches(lengths, batch_size, pool, content_rng)
        members.sort(key=lambda m: -int(lengths[m].max()))  # ranked by need (stable)
        pads = [pad_lengths[i] for i in assign_buckets(np.array([lengths[m].max() for m in members]), pad_lengths)]
        chunks = [_chunk(m, pad, batch_size)[0] for m, pad in zip(members, pads)]
    if seed is None:
        return chunks
    # Chunk i has the same (or, ranked by need, nearly the same) shape for every seed, so one
    # permutation of the epoch orders them all.
    return [chunks[i] for i in np.random.default_rng([epoch]).permutation(len(chunks))]


def align_steps(plans: Sequence[Sequence[PlannedBatch]]) -> list[list[PlannedBatch]]:
    """The seeds' plans with step ``i`` of every seed padded to the largest of their pad lengths at
    ``i``: one shape per step for a vmapped step. The plans must have equally many batches."""
    if len({len(p) for p in plans}) > 1:
        raise ValueError("the seeds' plans have different numbers of batches")
    steps = [max(p[i].length for p in plans) for i in range(len(plans[0]))] if plans else []
    return [[PlannedBatch(t, b.conversations) for t, b in zip(steps, plan)] for plan in plans]


def example_batch(lengths: np.ndarray, length: int, batch_size: int) -> PlannedBatch:
    """A batch ``[B, length]`` holding only the shortest conversation: what compiles a pad length that
    the plan at hand may not use (drawn batchings)."""
    conversations = np.full(batch_size, -1, dtype=np.int64)
    conversations[0] = int(np.argmin(lengths))
    if lengths[conversations[0]] > length:
        raise ValueError(f"no conversation fits the pad length {length}")
    return PlannedBatch(int(length), conversations)


def padding_efficiency(lengths: np.ndarray, plan: Sequence[PlannedBatch]) -> float:
    """Real utterances / padded slots (``B * T`` summed over the batches of ``plan``)."""
    padded = sum(len(p.conversations) * p.length for p in plan)
    return float(np.sum(lengths)) / padded if padded else 1.0


@dataclasses.dataclass(frozen=True)
class BatchPlanner:
    """The batches of a run: the pad lengths of training and of evaluation, and every epoch's plan.

    Training pads to ``train_pads`` (at most ``num_buckets`` compiled training shapes), evaluation and
    prediction to ``eval_pads`` (their step compiles on its own), each chosen on its own splits.

    Attributes:
      batch_size: conversations per batch ``B``.
      batching: how training batches are drawn (`BATCHING`).
      pool_batches: batches per pool of ``bucketed`` batching.
      train_pads, eval_pads: the pad lengths of training and of evaluation.
    """

    batch_size: int
    batching: str
    pool_batches: int
    train_pads: tuple[int, ...]
    eval_pads: tuple[int, ...]

    @classmethod
    def create(cls, train_cfg, train_lengths: np.ndarray, eval_lengths: Sequence[np.ndarray]) -> "BatchPlanner":
        """Pad lengths for the training split's ``train_lengths [M]`` and the evaluated splits'
        ``eval_lengths`` under ``train_cfg`` (a `mister_jax.config.TrainConfig`)."""
        cfg = train_cfg
        train_pads = choose_pad_lengths(
            [train_lengths], cfg.batch_size, cfg.num_buckets, cfg.bucket_multiple, cfg.batching, cfg.pool_batches
        )
        eval_pads = choose_pad_lengths(
            list(eval_lengths), cfg.batch_size, cfg.num_buckets, cfg.bucket_multiple, "sorted"
        )
        return cls(cfg.batch_size, cfg.batching, cfg.pool_batches, train_pads, eval_pads)

    def train_epoch(
        self, lengths: np.ndarray, seeds: Sequence[int], epoch: int, aligned: bool
    ) -> list[list[PlannedBatch]]:
        """Per seed, the training batches of ``epoch``; with ``aligned`` step ``i`` has one shape for
        every seed (`align_steps`), as a step over stacked seeds needs."""
        plans = [
            epoch_plan(
                lengths,
                self.train_pads,
                self.batch_size,
                seed=s,
                epoch=epoch,
                batching=self.batching,
                pool_batches=self.pool_batches,
            )
            for s in seeds
        ]
        return align_steps(plans) if aligned else plans

    def evaluation(self, lengths: np.ndarray) -> list[PlannedBatch]:
        """The batches of an evaluated split, length-sorted, in their natural order."""
        return epoch_plan(lengths, self.eval_pads, self.batch_size, seed=None, epoch=0)

    def train_shapes(self, plan: Sequence[PlannedBatch]) -> list[int]:
        """The pad lengths training compiles: those of ``plan`` for fixed batchings; all of them for
        drawn batchings, whose later epochs may need any."""
        if self.batching in ("random", "bucketed"):
            return sorted(set(self.train_pads))
        return sorted({p.length for p in plan})

    def example(self, lengths: np.ndarray, length: int) -> PlannedBatch:
        """A batch ``[B, length]`` that compiles the training step for pad length ``length``."""
        return example_batch(lengths, length, self.batch_size)
