"""LoRA fine-tuning of an encoder + head with focal loss; model selection on validation weighted F1.

Only the trainable parameters move: LoRA matrices, modules the encoder marks as fully trained (the
speech projector) and the head. The state of the epoch with the best validation weighted F1 is kept
and restored at the end (DESIGN §5 applies the same rule to MiSTER-E).

A trained model is a folder: `adapter/` (peft `save_pretrained`: adapter_config.json,
adapter_model.safetensors), `head.safetensors` + `head_config.json`, and `training.json` (label names,
settings, history, scores).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from sklearn.metrics import f1_score

from encoders_torch.corpora import Utterance
from encoders_torch.encoder import EmotionModel
from encoders_torch.heads import focal_loss

TRAINING = "training.json"
ADAPTER = "adapter"
_SORT_WINDOW = 50  # batches whose utterances are sorted by length together when training


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Defaults from DESIGN §6: lr 1e-5, batch 8, focal loss (γ = 3, Eq. 19)."""

    epochs: int = 3
    batch_size: int = 8
    lr: float = 1e-5
    head_lr: float | None = None  # None: same as lr
    gamma: float = 3.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    eval_batch_size: int = 32
    seed: int = 0
    log_every: int = 200  # batches between progress lines (0: none)


def length_batches(
    lengths: Sequence[float], batch_size: int, rng: np.random.Generator | None = None
) -> list[np.ndarray]:
    """Index batches of similar length.

    Without `rng`: a stable sort by length, cut into consecutive batches (deterministic; extraction).
    With `rng`: shuffle, sort by length inside windows of `_SORT_WINDOW` batches, shuffle the batches.
    """
    lengths = np.asarray(lengths, dtype=np.float64)
    if rng is None:
        order = np.argsort(lengths, kind="stable")
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    order = rng.permutation(len(lengths))
    window = batch_size * _SORT_WINDOW
    batches = []
    for start in range(0, len(order), window):
        part = order[start:start + window]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def autocast(device: torch.device, dtype: torch.dtype):
    """bfloat16 autocast on CUDA when asked for; a no-op on CPU (float32)."""
    if device.type == "cuda" and dtype == torch.bfloat16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def predict(
    model: EmotionModel,
    utterances: Sequence[Utterance],
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> tuple[np.ndarray, np.ndarray]:
    """(logits `[N, C]`, embeddings `[N, E]`) in the order of `utterances`; batches sorted by length."""
    model.eval()
    logits = np.zeros((len(utterances), model.head.config.num_classes), np.float32)
    embeddings = np.zeros((len(utterances), model.head.config.embedding_dim), np.float32)
    lengths = [model.encoder.length(u) for u in utterances]
    for idx in length_batches(lengths, batch_size):
        with autocast(device, dtype):
            out_logits, out_embedding = model(to_device(model.encoder.collate([utterances[i] for i in idx]), device))
        logits[idx] = out_logits.float().cpu().numpy()
        embeddings[idx] = out_embedding.float().cpu().numpy()
    return logits, embeddings


def weighted_f1(labels: Sequence[int], logits: np.ndarray) -> float:
    """Weighted F1 (sklearn, support-weighted over the classes present) of `argmax(logits)`."""
    return float(f1_score(np.asarray(labels), np.asarray(logits).argmax(-1), average="weighted", zero_division=0))


def train_epoch(
    model: EmotionModel,
    optimizer: torch.optim.Optimizer,
    utterances: Sequence[Utterance],
    config: TrainConfig,
    rng: np.random.Generator,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    log: Callable[[str], None] = print,
    log_every: int = 0,
) -> float:
    """One pass over `utterances` in length-grouped shuffled batches; returns the mean focal loss.

    With `log_every`, logs the running mean loss every that many batches.
    """
    model.train()
    params = model.trainable_parameters()
    lengths = [model.encoder.length(u) for u in utterances]
    total, count = 0.0, 0
    batches = length_batches(lengths, config.batch_size, rng)
    started = time.time()
    for step, idx in enumerate(batches, 1):
        chosen = [utterances[i] for i in idx]
        labels = torch.tensor([u.label for u in chosen], device=device)
        with autocast(device, dtype):
            logits, _ = model(to_device(model.encoder.collate(chosen), device))
        loss = focal_loss(logits, labels, config.gamma)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        total += float(loss.detach()) * len(idx)
        count += len(idx)
        if log_every and step % log_every == 0:
            log(f"  step {step}/{len(batches)}: mean focal loss {total / count:.4f} ({time.time() - started:.0f} s)")
    return total / max(count, 1)


def make_optimizer(model: EmotionModel, config: TrainConfig) -> torch.optim.Optimizer:
    head = [p for p in model.head.parameters() if p.requires_grad]
    encoder = [p for p in model.encoder.parameters() if p.requires_grad]
    groups = [{"params": encoder, "lr": config.lr}, {"params": head, "lr": config.head_lr or config.lr}]
    return torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=config.weight_decay)


def fit(
    model: EmotionModel,
    train: Sequence[Utterance],
    val: Sequence[Utterance],
    config: TrainConfig,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    log: Callable[[str], None] = print,
) -> dict:
    """Fine-tunes for `config.epochs`, keeps the epoch with the best validation weighted F1.

    Returns the history: per-epoch train loss and val weighted F1, `best_epoch` (0-based) and
    `best_val_weighted_f1`; the model holds the best epoch's weights on return.
    """
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    model.to(device)
    optimizer = make_optimizer(model, config)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    history = {"train_loss": [], "val_weighted_f1": [], "epoch_seconds": [], "best_epoch": -1, "best_val_weighted_f1": -1.0}
    best_state = None
    for epoch in range(config.epochs):
        start = time.time()
        loss = train_epoch(model, optimizer, train, config, rng, device, dtype, log, config.log_every)
        logits, _ = predict(model, val, config.eval_batch_size, device, dtype)
        score = weighted_f1([u.label for u in val], logits)
        history["train_loss"].append(loss)
        history["val_weighted_f1"].append(score)
        history["epoch_seconds"].append(round(time.time() - start, 1))
        log(f"epoch {epoch + 1}/{config.epochs}: train focal loss {loss:.4f}, val weighted F1 {score:.4f} "
            f"({time.time() - start:.0f} s)")
        if score > history["best_val_weighted_f1"]:
            history["best_epoch"], history["best_val_weighted_f1"] = epoch, score
            best_state = {n: p.detach().clone() for n, p in trainable.items()}
    if best_state is not None:
        with torch.no_grad():
            for n, p in trainable.items():
                p.copy_(best_state[n])
    return history


def save_trained(directory: str | Path, model: EmotionModel, info: dict) -> Path:
    """Writes adapter, head and `training.json` into a temporary folder, then renames it to `directory`."""
    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.encoder.save_adapter(tmp / ADAPTER)
    model.head.save(tmp)
    (tmp / TRAINING).write_text(json.dumps(info, indent=2) + "\n")
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)
    return directory


def is_trained(directory: str | Path) -> bool:
    directory = Path(directory)
    return (directory / TRAINING).is_file() and (directory / ADAPTER / "adapter_config.json").is_file()
