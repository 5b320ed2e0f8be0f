"""bridges: the NumPy-only feature store that carries utterance embeddings from encoders_torch to mister_jax."""

from bridges.store import (
    FORMAT,
    SPLITS,
    VERSION,
    Conversation,
    FeatureStore,
    Split,
    StoreError,
    init_store,
    read_manifest,
    write_index,
    write_manifest,
    write_modality,
)

__all__ = [
    "FORMAT",
    "SPLITS",
    "VERSION",
    "Conversation",
    "FeatureStore",
    "Split",
    "StoreError",
    "init_store",
    "read_manifest",
    "write_index",
    "write_manifest",
    "write_modality",
]
