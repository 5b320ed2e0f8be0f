"""On-disk cache of a frozen audio tower's outputs, one file per clip (issue #23).

The speech LLM's audio encoder is frozen (DESIGN §7): what it gives for a clip never changes while
fine-tuning, so 50 epochs need it once. `AudioTowerCache` keeps the tower's output rows of each clip
(its real positions only, float32 `[n, D]`, `.npy`) under `ROOT/MODEL_KEY/DIGEST.npy`, where DIGEST
is the sha256 of the clip's bytes and MODEL_KEY the digest of what the rows depend on (the tower's
weights and configuration, the truncation length and the feature extractor's settings). A changed clip
or another model therefore never reads stale rows, and the folder can be shared by runs and folds.
Files are written under a temporary name and renamed, so that an interrupted run leaves no half file
and processes writing the same clip at once do not clash.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from encoders_torch.encoder import file_digest


def model_key(tower: nn.Module, settings: dict) -> str:
    """sha256 (16 hex digits) of the tower's parameters and buffers (names, dtypes, bytes) and `settings`."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for name, tensor in tower.state_dict().items():
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)}".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


class AudioTowerCache:
    """The cached tower outputs of one model under `root / key`."""

    def __init__(self, root: str | Path, key: str):
        self.directory = Path(root) / key
        self._digests: dict[Path, str] = {}  # clip → its digest, read once per run

    def path(self, audio: Path) -> Path:
        audio = Path(audio)
        if audio not in self._digests:
            self._digests[audio] = file_digest([audio])
        return self.directory / f"{self._digests[audio]}.npy"

    def load(self, clips: Sequence[Path]) -> list[np.ndarray] | None:
        """The cached rows of every clip, or None when any is missing."""
        paths = [self.path(c) for c in clips]
        if not all(p.is_file() for p in paths):
            return None
        return [np.load(p) for p in paths]

    def save(self, audio: Path, rows: np.ndarray) -> None:
        path = self.path(audio)
        if path.is_file():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npy")
        np.save(tmp, np.ascontiguousarray(rows, dtype=np.float32))
        os.replace(tmp, path)
