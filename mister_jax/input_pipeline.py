"""Feature store → `SplitData` in host memory → padded `Batch`es (DESIGN §2, §5).

`open_store` opens (or, for the demo, builds) a store and checks its values; `load_splits` reads the
splits a run needs; `make_batch` gathers the conversations of a `mister_jax.batching.PlannedBatch`.

Shapes: ``speech [B, T, Ds]`` (None when not loaded), ``text [B, T, Dt]``, ``labels [B, T]`` (``-1`` for
padding and for unlabelled utterances), ``mask [B, T]`` (``True`` for real utterances), ``rows [B, T]``
(row of the utterance in its split, ``-1`` for padding).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import numpy as np

from bridges import FeatureStore, StoreError
from bridges.demo import build_demo_store
from mister_jax.batching import PlannedBatch
from mister_jax.config import Config
from mister_jax.errors import UsageError

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
    rows = (
        np.concatenate([np.arange(data.starts[c], data.starts[c] + data.lengths[c]) for c in conversations])
        if conversations.size
        else np.zeros(0, dtype=np.int64)
    )
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
    return (select_conversations(train, order[n_val:], "train"), select_conversations(train, order[:n_val], "val"))


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


def stack_batches(batches: Sequence[Batch]) -> Batch:
    """One `Batch` with a leading seed axis ``[K, B, T, ...]`` from K batches of one shape."""
    return Batch(*(None if parts[0] is None else np.stack(parts) for parts in zip(*batches)))


def open_store(dataset: str, features: str):
    """Opens ``features/dataset`` (building the demo store when asked for and absent)."""
    path = Path(features) / dataset
    if os.path.isfile(features):
        raise UsageError(
            f"--features {features}: is a file, not a folder — pass the store root, the folder that holds {dataset}/"
        )
    try:
        if dataset == "demo" and not (path / "manifest.json").exists():
            try:
                build_demo_store(features)
            except OSError as err:
                raise UsageError(
                    f"--features {features}: cannot build the demo store there ({err.strerror}) — "
                    f"pass a writable --features ROOT"
                ) from None
        if not path.is_dir():
            raise UsageError(
                f"{path}: no feature store — make one with `python -m encoders_torch.extract --dataset {dataset} "
                f"--out {features} ...`, write it by hand per DESIGN §2, or try --dataset demo"
            )
    except PermissionError:
        pass  # a folder on the way cannot be entered: FeatureStore.open names it
    return open_store_at(path)


def open_store_at(path: Path) -> FeatureStore:
    """Opens the store at ``path`` and checks its values (`bridges.FeatureStore.check_values`)."""
    try:
        store = FeatureStore.open(path)
        problems = store.check_values()
    except StoreError as err:
        raise UsageError("\n".join(err.problems)) from None
    if problems:
        raise UsageError("\n".join(problems))
    return store


def required_modalities(variant: str) -> tuple[str, ...]:
    return ("text",) if variant == "text-only" else ("speech", "text")


def fit_to_store(config: Config, store: FeatureStore) -> Config:
    """``config`` with the store's feature dims and number of classes; refuses a store that lacks a
    modality the variant needs."""
    missing = [m for m in required_modalities(config.model.variant) if m not in store.modalities]
    if missing:
        raise UsageError(
            f"{store.directory / 'manifest.json'}: variant '{config.model.variant}' needs modality "
            f"'{missing[0]}', which this store lacks — extract it with `python -m encoders_torch.extract "
            f"--modality {missing[0]}`, or pass --variant text-only"
        )
    dims = {f"{m}_dim": store.modalities[m]["dim"] for m in MODALITIES if m in store.modalities}
    try:
        model = dataclasses.replace(config.model, num_classes=len(store.label_names), **dims)
    except ValueError as err:
        raise UsageError(f"--set: {err}") from None
    return dataclasses.replace(config, model=model)


def load_splits(store, variant: str, train_cfg, no_val: str = "carve", log=print):
    """``(train, val, test, val_source)``: the splits a run trains on, as `SplitData`, with only the
    modalities ``variant`` needs; a store without ``val`` gets one carved from train (``no_val="carve"``,
    `TrainConfig.val_fraction`, ``val_carve_seed``) or is refused (``"refuse"``). ``val_source`` is
    ``"store"`` or ``"carved"``."""
    modalities = required_modalities(variant)
    if "train" not in store.splits or "test" not in store.splits:
        raise UsageError(
            f"{store.directory / 'manifest.json'}: the store needs 'train' and 'test' splits "
            f"(it has {list(store.splits)}) — extract them"
        )
    if not (store.split("test").labels >= 0).any():
        raise UsageError(
            f"{store.directory / 'test' / 'index.npz'}: no labelled utterance (every label is -1), but "
            f"training scores each seed on test — write its labels with bridges.write_index "
            f"(python -m mister_jax.predict needs none)"
        )
    train = load_split(store, "train", modalities)
    test = load_split(store, "test", modalities)
    if "val" in store.splits:
        return train, load_split(store, "val", modalities), test, "store"
    if no_val == "refuse":
        raise UsageError(
            f"{store.directory / 'manifest.json'}: the store has no 'val' split — extract one, "
            f"or pass --no-val carve to carve it from train"
        )
    cfg = train_cfg
    train, val = carve_validation(train, cfg.val_fraction, cfg.val_carve_seed)
    for name, part in (("train", train), ("val", val)):
        if not (part.labels >= 0).any():
            raise UsageError(
                f"{store.directory / 'train' / 'index.npz'}: after carving val from train ({val.num_conversations} "
                f"of {train.num_conversations + val.num_conversations} conversations, val_carve_seed "
                f"{cfg.val_carve_seed}), {name} has no labelled utterance — label more training conversations, "
                f"extract a 'val' split, or pass another --set val_carve_seed=N"
            )
    log(
        f"the store has no 'val' split: carved {val.num_conversations} of "
        f"{train.num_conversations + val.num_conversations} "
        f"training conversations (fraction {cfg.val_fraction}, seed {cfg.val_carve_seed})"
    )
    return train, val, test, "carved"
