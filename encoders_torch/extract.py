"""`python -m encoders_torch.extract`: fine-tune an encoder (or load a trained one), write a modality to the store.

    python -m encoders_torch.extract --dataset meld --data-root DIR --modality text --model PATH --out ROOT

Steps: read the corpus (encoders_torch.corpora); unless `--adapter` names a trained folder, LoRA
fine-tune encoder + head on `train` for `--epochs` (50, as the paper, Sec. 4.2; `--patience N` stops
once N epochs in a row bring no better score), keep the adapter and head of the epoch whose pooled
classifier head has the best weighted F1 on the `val` split (the first of equal ones), and save them
to `ROOT/NAME/adapters/MODALITY` (a later run finds them there and does not train again); embed every
split in length-sorted batches with that adapter and head; write `index.npz` and `MODALITY.npy` per
split through `bridges` with provenance in the manifest's `source`.

Fine-tuning is resumable: the state after each epoch (weights, optimizer, random generators, history
with the best epoch and so the patience count) goes to `ROOT/NAME/adapters/.MODALITY.checkpoint/`, one
folder per epoch written under a temporary name and renamed when complete; an interrupted run
continues after the last complete epoch. The folder is removed once the trained folder is saved; one
written with other settings (but `--epochs`, `--patience`, `--log-every`) is discarded.

IEMOCAP leave-one-session-out (`--fold K`, K = 1 … 5): fold K tests on session K, validates on the
next one (cyclic: fold 5 validates on Ses01, the paper's split) and trains on the other three. The
encoder is fine-tuned on the fold's train sessions, selected on its val session, and every utterance of
all five sessions is exported into `ROOT/iemocap-foldK` as that fold's `train`, `val` and `test` splits
(`mister_jax.folds` pools them again). For IEMOCAP the manifest's `encoders` field records, per
modality, the sessions the encoder was fine-tuned and selected on (also without `--fold`: the paper's
split is fold 5's), and `training.json` of a trained folder records them too; `--fold K` refuses an
`--adapter` that saw session K or does not say what it saw.

Embedding is resumable: every `--chunk-size` utterances (in length order) land in a chunk file under
`ROOT/NAME/.work/MODALITY/SPLIT/`; an interrupted run restarts at the first missing chunk. Chunks are
tied to the adapter, head and utterance list by a fingerprint, merged when a split is complete and
then removed.

Under `torchrun --nproc_per_node N -m encoders_torch.extract ...` (encoders_torch.distributed)
fine-tuning is data-parallel with the global batch `--batch-size × N`, and the export hands each
split's chunks round-robin to the processes (batches of the global batch size, so the chunk files are
those of a single-process run with `--batch-size B×N`); rank 0 validates, saves the trained folder,
merges the chunks and writes the store. The checkpoint and chunk folders must be on a file system
every process sees.

Speed (docs/BENCHMARKS.md, benchmarks/finetune.py): `--gradient-checkpointing` and bfloat16
autocast (`--precision`) are on by default on CUDA; `--attention sdpa` (PyTorch's scaled dot-product
attention) is the default; the speech model's frozen audio tower runs once per utterance and its
outputs are cached in `ROOT/NAME/.audio-cache/` for every later epoch and run (`--no-audio-cache`: off).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import peft
import torch
import transformers

import bridges
from encoders_torch import distributed
from encoders_torch.audio import AudioError
from encoders_torch.corpora import DATASETS, SPLITS, Conversation, Corpus, CorpusError, Utterance, read_corpus
from encoders_torch.custom_corpus import relabel
from encoders_torch.encoder import (
    EmotionModel,
    EncoderError,
    LoraSettings,
    UtteranceEncoder,
    file_digest,
    resolve_device,
)
from encoders_torch.finetune import (
    ADAPTER,
    TRAINING,
    TrainConfig,
    autocast,
    fit,
    is_trained,
    save_trained,
    to_device,
    weighted_f1,
)
from encoders_torch.heads import HEAD_CONFIG, HEAD_WEIGHTS, ClassifierHead, HeadConfig


def limit_conversations(conversations: Sequence[Conversation], max_utterances: int | None) -> tuple[Conversation, ...]:
    """Leading whole conversations holding at most `max_utterances` utterances (at least one conversation)."""
    if max_utterances is None:
        return tuple(conversations)
    kept, total = [], 0
    for conversation in conversations:
        if kept and total + len(conversation) > max_utterances:
            break
        kept.append(conversation)
        total += len(conversation)
    return tuple(kept)


IEMOCAP_SESSIONS = tuple(f"Ses{s:02d}" for s in range(1, 6))


def iemocap_fold(k: int) -> dict[str, tuple[str, ...]]:
    """Split → sessions of leave-one-session-out fold `k` (1-based): test session k, val the next one
    (cyclic), train the other three (the rule of `mister_jax.folds.loso_folds`)."""
    if not 1 <= k <= len(IEMOCAP_SESSIONS):
        raise EncoderError(f"--fold {k}: IEMOCAP has folds 1 to {len(IEMOCAP_SESSIONS)}, one per session")
    test, val = IEMOCAP_SESSIONS[k - 1], IEMOCAP_SESSIONS[k % len(IEMOCAP_SESSIONS)]
    return {"train": tuple(s for s in IEMOCAP_SESSIONS if s not in (test, val)), "val": (val,), "test": (test,)}


def session_of(utterance: Utterance) -> str:
    """The IEMOCAP session of an utterance (`Ses03M_script01_1_F012` → `Ses03`)."""
    return utterance.id[:5]


def fold_conversations(corpus: Corpus, k: int) -> dict[str, tuple[Conversation, ...]]:
    """The conversations of all of the corpus's splits regrouped into fold `k`'s train, val and test,
    in session order."""
    sessions = iemocap_fold(k)
    every = sorted((c for s in SPLITS for c in corpus.splits[s]), key=lambda c: session_of(c.utterances[0]))
    return {split: tuple(c for c in every if session_of(c.utterances[0]) in sessions[split]) for split in SPLITS}


def _sessions(utterances: Sequence[Utterance]) -> list[str]:
    return sorted({session_of(u) for u in utterances})


def encoder_sessions(args: argparse.Namespace, info: dict, trained_dir: Path) -> dict | None:
    """The manifest's `encoders` entry for this run (IEMOCAP only; `bridges.store`), from the trained
    folder's record; refuses, for `--fold K`, an encoder that saw session K or whose sessions are unknown."""
    if args.dataset != "iemocap":
        return None
    sessions = info.get("sessions")
    if args.fold is None:
        return None if sessions is None else {"fold": None, **sessions}
    test = iemocap_fold(args.fold)["test"][0]
    fix = "drop --adapter (or pass --retrain) to fine-tune on the fold's train sessions"
    if sessions is None:
        raise EncoderError(
            f"{trained_dir}: its {TRAINING} does not record the sessions it was fine-tuned on, so "
            f"fold {args.fold}'s test session {test} cannot be shown unseen — {fix}"
        )
    if test in sessions["trained_on"] + sessions["selected_on"]:
        raise EncoderError(
            f"{trained_dir}: fine-tuned on {', '.join(sessions['trained_on'])} and selected on "
            f"{', '.join(sessions['selected_on'])}, which includes fold {args.fold}'s test session "
            f"{test} — {fix}"
        )
    return {"fold": args.fold, **sessions}


def build_encoder(args: argparse.Namespace, adapter: Path | None, dtype: torch.dtype) -> UtteranceEncoder:
    lora = LoraSettings(
        r=args.lora_r,
        alpha=args.lora_alpha,
        dropout=args.lora_dropout,
        target_modules=tuple(args.lora_targets.split(",")) if args.lora_targets else None,
    )
    if args.modality == "text":
        from encoders_torch.text_encoder import TextEncoder

        return TextEncoder(
            args.model,
            lora,
            adapter,
            max_length=args.max_length,
            template=args.template,
            gguf_file=args.gguf_file,
            dtype=dtype,
            attn_implementation=args.attention,
        )
    from encoders_torch.speech_encoder import build_speech_encoder

    encoder = build_speech_encoder(
        args.model,
        lora,
        adapter,
        max_seconds=args.max_seconds,
        prompt=args.prompt,
        dtype=dtype,
        attn_implementation=args.attention,
    )
    if args.audio_cache:
        encoder.use_audio_cache(Path(args.out) / args.dataset / AUDIO_CACHE)
    return encoder


AUDIO_CACHE = ".audio-cache"  # beside the store's work dir: the frozen audio tower's outputs, one file per clip


@torch.no_grad()
def embed_split(
    model: EmotionModel,
    utterances: Sequence[Utterance],
    work_dir: Path,
    fingerprint: str,
    batch_size: int,
    chunk_size: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    log: Callable[[str], None] = print,
    world: distributed.World = distributed.World(),
) -> tuple[np.ndarray, np.ndarray] | None:
    """(embeddings `[N, E]`, logits `[N, C]`) in the order of `utterances`, via resumable chunk files.

    Utterances are sorted by length and cut into chunks of `chunk_size` (a multiple of `batch_size`);
    chunk `k` covers sorted positions `[k·chunk_size, (k+1)·chunk_size)` and is written atomically to
    `work_dir/chunk_{k:05d}.npz`. Chunks already on disk with the same `fingerprint` and the same sorted
    order are not recomputed; any other work dir is cleared first (a chunk holds sorted positions, so
    an order that changed, e.g. with the tokenizer, would put its rows in the wrong places).
    Distributed (`world`), rank `r` computes the missing chunks `k` with `k % size == r`; rank 0 then
    merges them all and returns the arrays, the other ranks return None.
    """
    chunk_size = max(batch_size, chunk_size - chunk_size % batch_size)
    order = np.argsort([model.encoder.length(u) for u in utterances], kind="stable")
    meta_path = work_dir / "meta.json"
    meta = {
        "fingerprint": fingerprint,
        "n": len(utterances),
        "batch_size": batch_size,
        "chunk_size": chunk_size,
        "order": hashlib.sha256(order.astype(np.int64).tobytes()).hexdigest()[:16],
    }
    if world.main:
        if meta_path.exists() and json.loads(meta_path.read_text()) != meta:
            shutil.rmtree(work_dir)
        work_dir.mkdir(parents=True, exist_ok=True)
        meta_path.write_text(json.dumps(meta))
    world.barrier()
    model.to(device).eval()
    n_chunks = -(-len(order) // chunk_size)
    done = 0
    for k in range(world.rank, n_chunks, world.size):
        rows = order[k * chunk_size : (k + 1) * chunk_size]
        path = work_dir / f"chunk_{k:05d}.npz"
        if not path.exists():
            parts = []
            for start in range(0, len(rows), batch_size):
                idx = rows[start : start + batch_size]
                with autocast(device, dtype):
                    out_logits, out_embedding = model(
                        to_device(model.encoder.collate([utterances[i] for i in idx]), device)
                    )
                parts.append((out_embedding.float().cpu().numpy(), out_logits.float().cpu().numpy()))
            tmp = path.with_name(f".{path.name}.tmp.npz")
            np.savez(tmp, embedding=np.concatenate([p[0] for p in parts]), logits=np.concatenate([p[1] for p in parts]))
            os.replace(tmp, path)
            done += 1
    done = int(world.sum([done])[0])
    if not world.main:
        return None
    embeddings = np.zeros((len(utterances), model.head.config.embedding_dim), np.float32)
    logits = np.zeros((len(utterances), model.head.config.num_classes), np.float32)
    for k in range(n_chunks):
        rows = order[k * chunk_size : (k + 1) * chunk_size]
        with np.load(work_dir / f"chunk_{k:05d}.npz") as z:
            embeddings[rows] = z["embedding"]
            logits[rows] = z["logits"]
    log(f"  {work_dir.name}: {len(utterances)} utterances, {n_chunks} chunks ({n_chunks - done} reused)")
    return embeddings, logits


def _check_decoder(splits: dict[str, list[Utterance]], data_root: str) -> None:
    """Fails before any model loads when audio other than wav needs an ffmpeg that is absent."""
    other = [u.audio for us in splits.values() for u in us if u.audio.suffix.lower() != ".wav"]
    if other and shutil.which("ffmpeg") is None:
        raise AudioError(
            f"--data-root {data_root}: {len(other)} audio files are {sorted({p.suffix for p in other})} "
            f"(e.g. {other[0].name}) "
            "and reading them needs ffmpeg, which is not installed — install it (apt-get install ffmpeg) "
            "or convert the clips to 16 kHz .wav beside them"
        )


def checkpoint_dir(trained_dir: Path) -> Path:
    """Where fine-tuning towards `trained_dir` keeps its per-epoch checkpoints until the trained folder is saved."""
    return trained_dir.with_name(f".{trained_dir.name}.checkpoint")


def _trained_model(
    args: argparse.Namespace,
    corpus: Corpus,
    splits: dict[str, list[Utterance]],
    trained_dir: Path,
    device: torch.device,
    dtype: torch.dtype,
    log: Callable[[str], None],
    world: distributed.World = distributed.World(),
) -> tuple[EmotionModel, dict]:
    """Loads the trained folder when it exists, else fine-tunes (data-parallel over `world`) and saves it
    there (rank 0; the others wait until it is written)."""
    if is_trained(trained_dir) and not args.retrain:
        info = json.loads((trained_dir / TRAINING).read_text())
        if info["label_names"] != list(corpus.label_names):
            raise EncoderError(
                f"--adapter {trained_dir}: trained for labels {info['label_names']}, "
                f"not {list(corpus.label_names)} — pass an adapter trained on {corpus.name}"
            )
        log(f"using the trained adapter and head in {trained_dir}")
        if not args.adapter and world.main:
            shutil.rmtree(checkpoint_dir(trained_dir), ignore_errors=True)
        encoder = build_encoder(args, trained_dir / ADAPTER, load_dtype(device, dtype))
        return EmotionModel(encoder, ClassifierHead.load(trained_dir)), info
    if args.adapter:
        raise EncoderError(
            f"--adapter {trained_dir}: no {TRAINING} and {ADAPTER}/ — pass a folder written by this command"
        )
    if args.epochs < 1 or args.patience < 0:
        raise EncoderError(
            f"--epochs {args.epochs} --patience {args.patience}: epochs must be 1 or more, patience 0 (off) or more"
        )
    labelled = {s: [u for u in splits[s] if u.label >= 0] for s in ("train", "val")}
    unlabelled = [s for s, us in labelled.items() if not us]
    if unlabelled:
        raise EncoderError(
            f"--dataset {corpus.name}: no labelled utterance in split {' or '.join(unlabelled)} to fine-tune on — "
            "label rows of both train and val, or pass --adapter with a trained folder"
        )
    if len(corpus.label_names) < 2:
        raise EncoderError(
            f"--dataset {corpus.name}: labels name {len(corpus.label_names)} class ({corpus.label_names[0]!r}); "
            "fine-tuning needs two or more — label rows of other classes too, or list the classes in the file"
        )
    torch.manual_seed(args.seed)
    encoder = build_encoder(args, None, load_dtype(device, dtype))
    if gradient_checkpointing(args, device):
        encoder.enable_gradient_checkpointing()
    head = ClassifierHead(
        HeadConfig(
            input_dim=encoder.hidden_size,
            num_classes=len(corpus.label_names),
            pooling=encoder.pooling,
            embedding_dim=args.embedding_dim,
            dropout=args.head_dropout,
        )
    )
    model = EmotionModel(encoder, head)
    config = TrainConfig(
        epochs=args.epochs,
        patience=args.patience,
        batch_size=args.batch_size * world.size,
        lr=args.lr,
        head_lr=args.head_lr,
        gamma=args.gamma,
        eval_batch_size=args.eval_batch_size,
        seed=args.seed,
        log_every=args.log_every,
    )
    n_trainable = sum(p.numel() for p in model.trainable_parameters())
    log(
        f"fine-tuning {args.modality} encoder {args.model}: {n_trainable:,} trainable parameters, "
        f"{len(labelled['train'])} train / {len(labelled['val'])} val utterances, device {device}"
        + (f", {world.size} processes (global batch {config.batch_size})" if world.distributed else "")
    )
    checkpoint = checkpoint_dir(trained_dir)
    history = fit(model, labelled["train"], labelled["val"], config, device, dtype, log, checkpoint, world)
    info = {
        "dataset": corpus.name,
        "label_names": list(corpus.label_names),
        "modality": args.modality,
        "train": dataclasses.asdict(config),
        "history": history,
        "encoder": encoder.source(),
        "head": dataclasses.asdict(head.config),
        **(
            {"sessions": {"trained_on": _sessions(splits["train"]), "selected_on": _sessions(splits["val"])}}
            if corpus.name == "iemocap"
            else {}
        ),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if world.main:
        save_trained(trained_dir, model, info)
        shutil.rmtree(checkpoint, ignore_errors=True)
        log(f"saved the adapter and head of epoch {history['best_epoch'] + 1} to {trained_dir}")
    world.barrier()
    return model, info


def load_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype the weights load in: the compute dtype on CUDA; float32 on CPU, where bfloat16 is autocast only."""
    return dtype if device.type == "cuda" else torch.float32


def precision(args: argparse.Namespace, dtype: torch.dtype) -> torch.dtype:
    """`--precision`: auto keeps resolve_device's choice (bfloat16 on CUDA, float32 on CPU)."""
    return {"auto": dtype, "float32": torch.float32, "bfloat16": torch.bfloat16}[args.precision]


def gradient_checkpointing(args: argparse.Namespace, device: torch.device) -> bool:
    """`--gradient-checkpointing`: auto is on for CUDA (memory for larger batches), off on CPU."""
    return args.gradient_checkpointing == "on" or (args.gradient_checkpointing == "auto" and device.type == "cuda")


def _adapter_labels(args: argparse.Namespace, corpus: Corpus) -> Corpus:
    """A custom corpus takes the label names of the trained folder it will use when all its classes are among
    them (so a file with few or no labels can be embedded with an adapter trained elsewhere)."""
    trained_dir = Path(args.adapter) if args.adapter else Path(args.out) / args.dataset / "adapters" / args.modality
    if corpus.name != "custom" or args.retrain or not is_trained(trained_dir):
        return corpus
    return relabel(corpus, json.loads((trained_dir / TRAINING).read_text())["label_names"])


def run(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict:
    """Fine-tunes or loads, embeds every split, writes the store; returns per-split weighted F1 of the head."""
    started = time.time()
    if args.fold is not None and args.dataset != "iemocap":
        raise EncoderError(
            f"--fold {args.fold} with --dataset {args.dataset}: leave-one-session-out folds exist for "
            f"IEMOCAP only — drop --fold to extract {args.dataset}'s own splits"
        )
    if args.fold is not None:
        iemocap_fold(args.fold)  # a fold that does not exist stops here
    require = ("text",) if args.modality == "text" else ("audio",)
    corpus = read_corpus(args.dataset, args.data_root, require, args.on_missing, args.mosi_split)
    if corpus.dropped:
        log(f"dropped (--on-missing skip): {corpus.dropped}")
    corpus = _adapter_labels(args, corpus)
    grouped = corpus.splits if args.fold is None else fold_conversations(corpus, args.fold)
    if args.fold is not None:
        log(f"fold {args.fold}: " + ", ".join(f"{s} {', '.join(iemocap_fold(args.fold)[s])}" for s in SPLITS))
    conversations = {s: limit_conversations(grouped[s], args.max_utterances) for s in SPLITS}
    splits = {s: [u for c in conversations[s] for u in c.utterances] for s in SPLITS}
    if args.modality == "speech":
        _check_decoder(splits, args.data_root)
    device, dtype = resolve_device(args.device)
    dtype = precision(args, dtype)
    world, device = distributed.init(device)
    if not world.main:
        log = _quiet
    if args.threads:
        torch.set_num_threads(args.threads)
    name = args.dataset if args.fold is None else f"{args.dataset}-fold{args.fold}"
    dataset_dir = Path(args.out) / name
    if args.adapter and args.retrain:
        raise EncoderError("--retrain with --adapter: choose one (--adapter uses a trained folder as it is)")
    trained_dir = Path(args.adapter) if args.adapter else dataset_dir / "adapters" / args.modality
    model, info = _trained_model(args, corpus, splits, trained_dir, device, dtype, log, world)
    sessions = encoder_sessions(args, info, trained_dir)
    trained_digest = file_digest(
        [trained_dir / HEAD_WEIGHTS, trained_dir / HEAD_CONFIG, *sorted((trained_dir / ADAPTER).glob("*.safetensors"))]
    )
    present = [s for s in SPLITS if splits[s]]  # a custom corpus may lack splits
    if world.main:
        dataset_dir = bridges.init_store(args.out, name, corpus.label_names, present)
    scores = {}
    work_root = dataset_dir / ".work" / args.modality
    features = {}
    for split in present:
        utterances = splits[split]
        fingerprint = trained_digest + hashlib.sha256("\n".join(u.id for u in utterances).encode()).hexdigest()[:16]
        exported = embed_split(
            model,
            utterances,
            work_root / split,
            fingerprint,
            args.batch_size * world.size,
            args.chunk_size,
            device,
            dtype,
            log,
            world,
        )
        if not world.main:
            continue
        embeddings, logits = exported
        labelled = [i for i, u in enumerate(utterances) if u.label >= 0]
        scores[split] = weighted_f1([utterances[i].label for i in labelled], logits[labelled]) if labelled else None
        features[split] = embeddings
    if not world.main:  # rank 0 writes the store
        return {"scores": {}, "store": str(dataset_dir), "trained": str(trained_dir), "seconds": time.time() - started}
    source = {
        "encoder": model.encoder.source(),
        "model": str(Path(args.model).resolve()),
        "model_digest": file_digest(sorted(Path(args.model).glob("*.json"))),  # config and tokenizer, not weights
        "head": dataclasses.asdict(model.head.config),
        "adapter": str(trained_dir.resolve()),
        "adapter_digest": trained_digest,
        "train": info.get("train"),
        "best_epoch": info.get("history", {}).get("best_epoch"),
        "head_weighted_f1": {s: None if v is None else round(v, 4) for s, v in scores.items()},
        "data_root": str(Path(args.data_root).resolve()),
        "max_utterances": args.max_utterances,
        "torch": torch.__version__,
        "peft": peft.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    for split in present:
        utterances = splits[split]
        bridges.write_index(
            dataset_dir,
            split,
            [u.id for u in utterances],
            [c.id for c in conversations[split] for _ in c.utterances],
            [u.label for u in utterances],
        )
        bridges.write_modality(dataset_dir, split, args.modality, features[split].astype(args.dtype), source, sessions)
    shutil.rmtree(work_root, ignore_errors=True)
    with contextlib.suppress(OSError):
        work_root.parent.rmdir()  # `.work` goes too once no other modality is mid-extraction
    log(
        f"wrote {args.modality} [{model.head.config.embedding_dim}] to {dataset_dir}; head weighted F1 "
        + ", ".join(f"{s} unlabelled" if v is None else f"{s} {v:.4f}" for s, v in scores.items())
        + f" ({time.time() - started:.0f} s)"
    )
    return {"scores": scores, "store": str(dataset_dir), "trained": str(trained_dir), "seconds": time.time() - started}


def _quiet(line: str) -> None:
    """The log of ranks other than 0: rank 0 speaks for the run."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m encoders_torch.extract",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dataset", required=True, choices=DATASETS)
    p.add_argument(
        "--data-root",
        required=True,
        help="the corpus release folder (see encoders_torch.corpora); for custom, the .jsonl or .csv file "
        "(docs/CUSTOM_CORPUS.md)",
    )
    p.add_argument("--modality", required=True, choices=("text", "speech"))
    p.add_argument("--model", required=True, help="local transformers model folder")
    p.add_argument("--out", required=True, help="store root; the store is OUT/DATASET")
    p.add_argument(
        "--adapter", help="trained folder (adapter/, head.safetensors, training.json) to use instead of fine-tuning"
    )
    p.add_argument(
        "--retrain", action="store_true", help="fine-tune again even if OUT/DATASET/adapters/MODALITY exists"
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=50,
        help="fine-tuning epochs (the paper: 50, Sec. 4.2); kept and exported are the adapter and head "
        "of the epoch whose pooled classifier head scores the best weighted F1 on the corpus's val "
        "split (the first of equal ones)",
    )
    p.add_argument(
        "--patience",
        type=int,
        default=0,
        help="stop fine-tuning once N epochs in a row bring no better val weighted F1 (default 0: off)",
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eval-batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--head-lr", type=float, default=None, help="learning rate of the head (default: --lr)")
    p.add_argument("--gamma", type=float, default=3.0, help="focal loss γ (0 = cross-entropy)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (CUDA + bfloat16 when present, else CPU), cpu, cuda")
    p.add_argument("--log-every", type=int, default=100, help="training batches between progress lines (0: none)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    p.add_argument("--max-utterances", type=int, default=None, help="per split, whole conversations (quick runs)")
    p.add_argument("--max-length", type=int, default=128, help="text: tokens per utterance (longer ones are truncated)")
    p.add_argument("--template", default="{text}", help="text: utterance format, fields {text} and {speaker}")
    p.add_argument("--gguf-file", default=None, help="text: GGUF file inside --model")
    p.add_argument("--max-seconds", type=float, default=30.0, help="speech: audio longer than this is truncated")
    p.add_argument("--prompt", default=None, help="speech: instruction after the audio")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--lora-dropout", type=float, default=0.1)
    p.add_argument("--lora-targets", default=None, help="comma-separated Linear module names (default: attention q/v)")
    p.add_argument("--embedding-dim", type=int, default=2048)
    p.add_argument("--head-dropout", type=float, default=0.1)
    p.add_argument(
        "--on-missing",
        default="fail",
        choices=("fail", "skip"),
        help="utterances lacking transcript/audio or with unknown labels: stop, or drop them",
    )
    p.add_argument("--mosi-split", default="paper", choices=("paper", "sdk"))
    p.add_argument(
        "--fold",
        type=int,
        default=None,
        help="IEMOCAP leave-one-session-out fold K (1-5): fine-tune on its train sessions, select on its "
        "val session, export every utterance to OUT/iemocap-foldK (mister_jax.folds)",
    )
    p.add_argument("--dtype", default="float32", choices=("float32", "float16"), help="dtype of the stored features")
    p.add_argument("--chunk-size", type=int, default=256, help="utterances per resumable chunk file")
    p.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "float32", "bfloat16"),
        help="compute dtype: auto = bfloat16 (weights and autocast) on CUDA, float32 on CPU; bfloat16 on CPU "
        "autocasts float32 weights",
    )
    p.add_argument(
        "--gradient-checkpointing",
        default="auto",
        choices=("auto", "on", "off"),
        help="recompute the encoder's activations in the backward pass instead of keeping them "
        "(less memory, more compute); auto: on for CUDA, off on CPU",
    )
    p.add_argument(
        "--attention",
        default="sdpa",
        choices=("sdpa", "eager"),
        help="attention kernel of the encoder: PyTorch's scaled dot-product attention, or transformers' eager one",
    )
    p.add_argument(
        "--no-audio-cache",
        dest="audio_cache",
        action="store_false",
        help="speech: run the frozen audio tower every epoch instead of caching its outputs in "
        f"OUT/DATASET/{AUDIO_CACHE}",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        run(args)
    except (CorpusError, EncoderError, AudioError, bridges.StoreError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
