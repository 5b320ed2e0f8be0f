"""LoRA fine-tuning of an encoder + head with focal loss; model selection on validation weighted F1.

Only the trainable parameters move: LoRA matrices, modules the encoder marks as fully trained (the
speech projector) and the head. After every epoch the pooled classifier head scores the validation
split; the state of the epoch with the best weighted F1 (the first of equal ones) is kept and restored
at the end (DESIGN §5 applies the same rule to MiSTER-E). With `patience` N, training stops once N
epochs in a row bring no better score.

With a checkpoint folder, fine-tuning is resumable: after every epoch the trainable weights, the
optimizer, the random generators and the history (best epoch, hence the epochs since it) are written
to `epoch_NNNN/` through a temporary folder that is renamed when complete; that folder and the best
epoch's are kept. A run called again with the same folder continues after the last complete epoch.

Under `torchrun` (encoders_torch.distributed) `fit` trains data-parallel: every rank draws the same
global batches of `batch_size` and computes its shard of each; rank 0 scores validation, keeps the
checkpoints and hands its score to the others, so every rank keeps the same history and best state.

A trained model is a folder: `adapter/` (peft `save_pretrained`: adapter_config.json,
adapter_model.safetensors), `head.safetensors` + `head_config.json`, and `training.json` (label names,
settings, history, scores).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from sklearn.metrics import f1_score
from torch import nn

from encoders_torch.corpora import Utterance
from encoders_torch.distributed import World
from encoders_torch.encoder import EmotionModel, EncoderError
from encoders_torch.heads import focal_loss

TRAINING = "training.json"
ADAPTER = "adapter"
_SORT_WINDOW = 50  # batches whose utterances are sorted by length together when training
_EPOCH = "epoch_"  # checkpoint folders: epoch_NNNN holds the state after 0-based epoch NNNN
_STATE, _WEIGHTS, _TRAINING_STATE = "state.json", "weights.safetensors", "training_state.pt"
_RESUMABLE = ("epochs", "patience", "log_every")  # settings a resumed run may change
BATCHINGS = ("bucketed", "shuffled")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Defaults from DESIGN §6: 50 epochs (Sec. 4.2), lr 1e-5, batch 8, focal loss (γ = 3, Eq. 19)."""

    epochs: int = 50
    patience: int = 0  # stop after this many epochs in a row without a better val weighted F1 (0: off)
    batch_size: int = 8  # the global batch: under torchrun each rank computes its shard of it
    batching: str = "bucketed"  # "bucketed": `length_batches` with a generator; "shuffled": `shuffled_batches`
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
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    order = rng.permutation(len(lengths))
    window = batch_size * _SORT_WINDOW
    batches = []
    for start in range(0, len(order), window):
        part = order[start : start + window]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def shuffled_batches(count: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """The authors' batching: a random permutation cut into consecutive batches, each padded to its longest."""
    order = rng.permutation(count)
    return [order[i : i + batch_size] for i in range(0, count, batch_size)]


def epoch_batches(lengths: Sequence[float], config: TrainConfig, rng: np.random.Generator) -> list[np.ndarray]:
    """One epoch's global batches by `config.batching`: length-bucketed (little padding) or shuffled."""
    if config.batching == "bucketed":
        return length_batches(lengths, config.batch_size, rng)
    if config.batching == "shuffled":
        return shuffled_batches(len(lengths), config.batch_size, rng)
    raise ValueError(f"batching={config.batching!r}: choose one of {BATCHINGS}")


def autocast(device: torch.device, dtype: torch.dtype):
    """bfloat16 autocast on the device when `dtype` is bfloat16 (the default on CUDA); else a no-op (float32)."""
    if dtype == torch.bfloat16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors on `device`; other entries (e.g. the clips an audio cache fills) as they are."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


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
    world: World = World(),
    forward: nn.Module | None = None,
) -> float:
    """One pass over `utterances` in the batches of `epoch_batches`; returns the mean focal loss.

    With `log_every`, logs the running mean loss every that many batches. Distributed (`world`), this
    rank computes its shard of every global batch through `forward` (the model in DDP) with its loss
    scaled by `world.size × shard / batch`, so that DDP's mean of the ranks' gradients is the gradient
    of the global batch's mean loss; a rank whose shard is empty runs one utterance with weight 0 so
    that it still joins the all-reduce.
    """
    model.train()
    forward = forward or model
    params = model.trainable_parameters()
    lengths = [model.encoder.length(u) for u in utterances]
    total, count = 0.0, 0
    batches = epoch_batches(lengths, config, rng)
    started = time.time()
    for step, idx in enumerate(batches, 1):
        shard = world.shard(idx)
        chosen = [utterances[i] for i in (shard if len(shard) else idx[:1])]
        labels = torch.tensor([u.label for u in chosen], device=device)
        with autocast(device, dtype):
            logits, _ = forward(to_device(model.encoder.collate(chosen), device))
        loss = focal_loss(logits, labels, config.gamma)
        scaled = loss * (world.size * len(shard) / len(idx)) if world.distributed else loss
        optimizer.zero_grad(set_to_none=True)
        scaled.backward()
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        total += float(loss.detach()) * len(shard)
        count += len(shard)
        if log_every and step % log_every == 0:
            running, seen = world.sum([total, count])
            log(f"  step {step}/{len(batches)}: mean focal loss {running / seen:.4f} ({time.time() - started:.0f} s)")
    total, count = world.sum([total, count])
    return total / max(count, 1)


def make_optimizer(model: EmotionModel, config: TrainConfig) -> torch.optim.Optimizer:
    head = [p for p in model.head.parameters() if p.requires_grad]
    encoder = [p for p in model.encoder.parameters() if p.requires_grad]
    groups = [{"params": encoder, "lr": config.lr}, {"params": head, "lr": config.head_lr or config.lr}]
    return torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=config.weight_decay)


def _fingerprint(model: EmotionModel, train: Sequence[Utterance], val: Sequence[Utterance], config: TrainConfig) -> str:
    """What a checkpoint is tied to: settings (but those in `_RESUMABLE`), encoder, head, trainable shapes,
    utterances."""
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in _RESUMABLE}
    identity = {
        "train": settings,
        "encoder": model.encoder.source(),
        "head": dataclasses.asdict(model.head.config),
        "trainable": [[n, list(p.shape)] for n, p in model.named_parameters() if p.requires_grad],
        "utterances": [[u.id for u in train], [u.id for u in val]],
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _epoch_dirs(checkpoint: Path) -> dict[int, Path]:
    return {int(p.name[len(_EPOCH) :]): p for p in checkpoint.glob(f"{_EPOCH}[0-9]*") if p.is_dir()}


def _save_epoch(
    checkpoint: Path,
    fingerprint: str,
    history: dict,
    trainable: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    rng: np.random.Generator,
    device: torch.device,
) -> None:
    """Writes the state after the last epoch of `history`, then removes the folders of other epochs than it
    and the best."""
    epoch = len(history["val_weighted_f1"]) - 1
    final = checkpoint / f"{_EPOCH}{epoch:04d}"
    tmp = checkpoint / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({n: p.detach().cpu().contiguous() for n, p in trainable.items()}, tmp / _WEIGHTS)
    generators = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        generators["cuda"] = torch.cuda.get_rng_state(device)
    torch.save({"optimizer": optimizer.state_dict(), "rng": generators}, tmp / _TRAINING_STATE)
    state = {"fingerprint": fingerprint, "history": history, "numpy_rng": rng.bit_generator.state}
    (tmp / _STATE).write_text(json.dumps(state, indent=1) + "\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for other, path in _epoch_dirs(checkpoint).items():
        if other not in (epoch, history["best_epoch"]):
            shutil.rmtree(path)
    with contextlib.suppress(FileNotFoundError):
        if history["best_epoch"] != epoch:
            (checkpoint / f"{_EPOCH}{history['best_epoch']:04d}" / _TRAINING_STATE).unlink()


def _restore(
    checkpoint: Path,
    fingerprint: str,
    trainable: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    rng: np.random.Generator,
    device: torch.device,
    log: Callable[[str], None],
    discard: bool = True,
) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """Loads the last complete epoch into the model, optimizer and generators: (history, best weights), or None.

    A checkpoint written for another fingerprint is removed when `discard` (rank 0's job), else ignored.
    """
    epochs = _epoch_dirs(checkpoint)
    if not epochs:
        return None
    last = epochs[max(epochs)]
    state = json.loads((last / _STATE).read_text())
    if state["fingerprint"] != fingerprint:
        if discard:
            log(f"discarding the fine-tuning checkpoint in {checkpoint}: written for other settings, model or data")
            shutil.rmtree(checkpoint)
        return None
    history = state["history"]
    best_dir = epochs.get(history["best_epoch"])
    if best_dir is None or not (best_dir / _WEIGHTS).is_file():
        raise EncoderError(
            f"fine-tuning checkpoint {checkpoint}: the best epoch's weights ({_EPOCH}"
            f"{history['best_epoch']:04d}/{_WEIGHTS}) are missing — delete the folder to start over"
        )
    with torch.no_grad():
        for n, value in load_file(last / _WEIGHTS).items():
            trainable[n].copy_(value)
    saved = torch.load(last / _TRAINING_STATE, weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    torch.set_rng_state(saved["rng"]["torch"])
    if device.type == "cuda" and "cuda" in saved["rng"]:
        torch.cuda.set_rng_state(saved["rng"]["cuda"], device)
    rng.bit_generator.state = state["numpy_rng"]
    log(
        f"resuming fine-tuning from {checkpoint}: {len(history['val_weighted_f1'])} epochs done, best epoch "
        f"{history['best_epoch'] + 1} (val weighted F1 {history['best_val_weighted_f1']:.4f})"
    )
    return history, load_file(best_dir / _WEIGHTS)


def _patience_spent(history: dict, patience: int) -> bool:
    """`patience` epochs have passed since the best one without a better val weighted F1."""
    return patience > 0 and len(history["val_weighted_f1"]) - 1 - history["best_epoch"] >= patience


def fit(
    model: EmotionModel,
    train: Sequence[Utterance],
    val: Sequence[Utterance],
    config: TrainConfig,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    log: Callable[[str], None] = print,
    checkpoint: str | Path | None = None,
    world: World = World(),
) -> dict:
    """Fine-tunes for `config.epochs` (fewer with `config.patience`), keeps the epoch with the best val weighted F1.

    Returns the history: per-epoch train loss and val weighted F1, `best_epoch` (0-based),
    `best_val_weighted_f1` and `stopped_early`; the model holds the best epoch's weights on return.
    With `checkpoint`, resumes from and writes to that folder (module docstring); a checkpoint written
    for other settings (but epochs, patience and log_every), another model or other utterances is discarded.
    Distributed (`world`), every rank resumes from the same folder (a file system they share), trains
    its shards, and takes rank 0's validation score; only rank 0 writes checkpoints.
    """
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    model.to(device)
    optimizer = make_optimizer(model, config)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    history = {
        "train_loss": [],
        "val_weighted_f1": [],
        "epoch_seconds": [],
        "best_epoch": -1,
        "best_val_weighted_f1": -1.0,
    }
    best_state = None
    checkpoint = Path(checkpoint) if checkpoint is not None else None
    fingerprint = _fingerprint(model, train, val, config) if checkpoint is not None else ""
    if checkpoint is not None:
        for turn in (True, False):  # rank 0 first, as it may discard the folder; then the others read it
            if world.main == turn:
                restored = _restore(checkpoint, fingerprint, trainable, optimizer, rng, device, log, world.main)
                if restored is not None:
                    history, best_state = restored
            world.barrier()
    forward = world.wrap(model, device)
    for epoch in range(len(history["val_weighted_f1"]), config.epochs):
        if _patience_spent(history, config.patience):
            break
        start = time.time()
        loss = train_epoch(
            model, optimizer, train, config, rng, device, dtype, log, config.log_every, world=world, forward=forward
        )
        score = None
        if world.main:
            logits, _ = predict(model, val, config.eval_batch_size, device, dtype)
            score = weighted_f1([u.label for u in val], logits)
        score = world.broadcast(score)
        history["train_loss"].append(loss)
        history["val_weighted_f1"].append(score)
        history["epoch_seconds"].append(round(time.time() - start, 1))
        log(
            f"epoch {epoch + 1}/{config.epochs}: train focal loss {loss:.4f}, val weighted F1 {score:.4f} "
            f"({time.time() - start:.0f} s)"
        )
        if score > history["best_val_weighted_f1"]:
            history["best_epoch"], history["best_val_weighted_f1"] = epoch, score
            best_state = {n: p.detach().clone() for n, p in trainable.items()}
        if checkpoint is not None and world.main:
            _save_epoch(checkpoint, fingerprint, history, trainable, optimizer, rng, device)
    history["stopped_early"] = len(history["val_weighted_f1"]) < config.epochs and _patience_spent(
        history, config.patience
    )
    if history["stopped_early"]:
        log(
            f"stopped early: no better val weighted F1 in the {config.patience} epochs after epoch "
            f"{history['best_epoch'] + 1} ({history['best_val_weighted_f1']:.4f})"
        )
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
