"""Feature store → padded conversation batches (DESIGN §2, §5).

A batch holds ``B`` whole conversations padded to one length ``T`` taken from a small, fixed set of pad
lengths (the *buckets*), so a jitted step compiles once per bucket. The plan of an epoch is a pure
function of ``(seed, epoch)``: the order of bucket shapes depends on the epoch only (so the seeds of a
vmapped step always see the same shape), the conversations inside each bucket are shuffled per
``(seed, epoch)``. Resuming at an epoch therefore replays exactly the batches an uninterrupted run sees.

Shapes: ``speech [B, T, Ds]`` (None when not loaded), ``text [B, T, Dt]``, ``labels [B, T]`` (``-1`` for padding and for
unlabelled utterances), ``mask [B, T]`` (``True`` for real utterances), ``rows [B, T]`` (row of the
utterance in its split, ``-1`` for padding).
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, NamedTuple, Sequence

import numpy as np

MODALITIES = ("speech", "text")


@dataclasses.dataclass(frozen=True)
class SplitData:
    """One split held in host memory, rows in store order (conversations contiguous).

    ``features`` maps a modality to ``float32 [N, D]``; ``starts``/``lengths`` ``[M]`` give each
    conversation's first row and its number of utterances.
    """

    name: str
    features: dict
    labels: np.ndarray
    utterance_ids: np.ndarray
    conversation_ids: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray

    @property
    def num_utterances(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_conversations(self) -> int:
        return int(self.lengths.shape[0])


class Batch(NamedTuple):
    """Padded conversations: ``speech [B,T,Ds]`` (None for text-only), ``text [B,T,Dt]``,
    ``labels int32 [B,T]`` (-1 = padding or unlabelled), ``mask bool [B,T]`` (real utterances)."""

    speech: np.ndarray
    text: np.ndarray
    labels: np.ndarray
    mask: np.ndarray


def load_split(store, split: str, modalities: Sequence[str]) -> SplitData:
    """Reads ``split`` of a ``bridges.FeatureStore`` into float32 host arrays (only ``modalities``)."""
    sp = store.split(split)
    conversations = sp.conversations()
    features = {m: np.asarray(sp.features(m), dtype=np.float32) for m in modalities}
    return SplitData(
        name=split,
        features=features,
        labels=np.asarray(sp.labels, dtype=np.int32),
        utterance_ids=np.asarray(sp.utterance_ids),
        conversation_ids=np.asarray(sp.conversation_ids),
        starts=np.asarray([c.start for c in conversations], dtype=np.int64),
        lengths=np.asarray([c.stop - c.start for c in conversations], dtype=np.int64),
    )


def select_conversations(data: SplitData, conversations: np.ndarray, name: str) -> SplitData:
    """The sub-split made of the given conversation indices, kept in store order."""
    conversations = np.sort(np.asarray(conversations, dtype=np.int64))
    rows = np.concatenate(
        [np.arange(data.starts[c], data.starts[c] + data.lengths[c]) for c in conversations]
    ) if conversations.size else np.zeros(0, dtype=np.int64)
    lengths = data.lengths[conversations]
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    return SplitData(
        name=name,
        features={m: f[rows] for m, f in data.features.items()},
        labels=data.labels[rows],
        utterance_ids=data.utterance_ids[rows],
        conversation_ids=data.conversation_ids[rows],
        starts=starts,
        lengths=lengths,
    )


def carve_validation(train: SplitData, fraction: float, seed: int = 0) -> tuple[SplitData, SplitData]:
    """Splits whole conversations of ``train`` into (train, val); ``val`` gets ``fraction`` of them.

    The choice depends only on ``seed`` and the number of conversations (DESIGN §2: a store without
    ``val``)."""
    m = train.num_conversations
    n_val = min(max(1, int(round(fraction * m))), m - 1)
    order = np.random.default_rng(seed).permutation(m)
    return (select_conversations(train, order[n_val:], "train"),
            select_conversations(train, order[:n_val], "val"))


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


@dataclasses.dataclass(frozen=True)
class PlannedBatch:
    """``conversations [B]`` (indices into the split, ``-1`` = empty slot) padded to ``length``."""

    length: int
    conversations: np.ndarray


def epoch_plan(lengths: np.ndarray, pad_lengths: Sequence[int], batch_size: int, *,
               seed: int | None, epoch: int) -> list[PlannedBatch]:
    """The batches of one epoch; pure function of ``(seed, epoch)``.

    ``seed=None`` keeps store order (evaluation, prediction). Otherwise the conversations of each
    bucket are permuted with ``default_rng([seed, epoch])`` and the sequence of bucket shapes with
    ``default_rng([epoch])``; the shape sequence is thus the same for every seed.
    """
    lengths = np.asarray(lengths)
    bucket = assign_buckets(lengths, pad_lengths)
    members = [np.flatnonzero(bucket == b) for b in range(len(pad_lengths))]
    if seed is not None:
        content_rng = np.random.default_rng([seed, epoch])
        members = [m[content_rng.permutation(len(m))] for m in members]
    chunks = []
    for b, m in enumerate(members):
        for i in range(0, len(m), batch_size):
            conv = np.full(batch_size, -1, dtype=np.int64)
            conv[: len(m[i:i + batch_size])] = m[i:i + batch_size]
            chunks.append(PlannedBatch(int(pad_lengths[b]), conv))
    if seed is not None:
        shape_order = np.random.default_rng([epoch]).permutation(len(chunks))
        by_bucket = {}
        for c in chunks:
            by_bucket.setdefault(c.length, []).append(c)
        shapes = [chunks[i].length for i in shape_order]
        cursor = {t: 0 for t in by_bucket}
        ordered = []
        for t in shapes:
            ordered.append(by_bucket[t][cursor[t]])
            cursor[t] += 1
        chunks = ordered
    return chunks


def padding_efficiency(lengths: np.ndarray, plan: Sequence[PlannedBatch]) -> float:
    """Real utterances / padded slots (``B * T`` summed over the batches of ``plan``)."""
    padded = sum(len(p.conversations) * p.length for p in plan)
    return float(np.sum(lengths)) / padded if padded else 1.0


def batch_rows(data: SplitData, planned: PlannedBatch) -> np.ndarray:
    """``rows [B, T]``: row of each utterance in the split, ``-1`` for padding."""
    rows = np.full((len(planned.conversations), planned.length), -1, dtype=np.int64)
    for i, c in enumerate(planned.conversations):
        if c >= 0:
            n = data.lengths[c]
            rows[i, :n] = np.arange(data.starts[c], data.starts[c] + n)
    return rows


def make_batch(data: SplitData, rows: np.ndarray) -> Batch:
    """Gathers a padded ``Batch`` for ``rows [B, T]``; a modality absent from ``data`` is ``None``
    (text-only variants)."""
    mask = rows >= 0
    safe = np.where(mask, rows, 0)

    def gather(modality):
        if modality in data.features:
            x = data.features[modality][safe]
            return np.where(mask[..., None], x, np.float32(0.0))
        return None

    labels = np.where(mask, data.labels[safe], -1).astype(np.int32)
    return Batch(gather("speech"), gather("text"), labels, mask)


def iterate_batches(data: SplitData, plan: Sequence[PlannedBatch]) -> Iterator[tuple[np.ndarray, Batch]]:
    """Yields ``(rows [B, T], Batch)`` for each planned batch."""
    for planned in plan:
        rows = batch_rows(data, planned)
        yield rows, make_batch(data, rows)
