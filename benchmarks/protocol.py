"""The IEMOCAP protocol through `python -m mister_jax.train`, end to end: what 100 epochs × 3 seeds cost.

    .venv/bin/python benchmarks/protocol.py [--dims paper|tiny] [--epochs N]

Builds an IEMOCAP-shaped feature store: the 92 training conversations of `train_epoch.py` (4,791
utterances), a validation split like session 1 (28 conversations, 1,019 utterances) and a test split
like session 5 (31 conversations, 1,623 utterances); 2048-d Gaussian speech and text, 6 classes. Then
it runs the training CLI with the iemocap preset as a user would (3 seeds interleaved on CPU, the test
split scored once at the end, the report) four times on one compilation cache: 1 epoch cold, 1 epoch
warm, and 1 + N epochs warm twice: with the default checkpoints (every 10 minutes, so none before
the end of so short a run) and with a checkpoint after every epoch (``--checkpoint-every 1``).

One epoch of the protocol is the difference of a longer run's wall time and the warm 1-epoch run's,
divided by N: without a checkpoint (training and validation of every seed) and with one; the
trainer's own timing of its training passes (``metrics.jsonl``, epochs after the first) is training,
the rest validation (and the checkpoint's host copies). The protocol is the cold run plus 99 epochs
without a checkpoint plus, per checkpoint the default schedule writes (one per 10 minutes), the
difference of the two kinds of epoch; with a checkpoint every epoch it is the cold run plus 99 epochs
with one.

Prints one line per figure and writes benchmarks/results/protocol.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from common import DIMS, RESULTS_DIR, machine_info, make_corpus, write_result  # noqa: E402
from mister_jax.presets import TrainConfig  # noqa: E402

PROTOCOL_EPOCHS = 100
CHECKPOINT_MINUTES = TrainConfig().checkpoint_minutes  # the default schedule
# IEMOCAP 6-class: session 1 (validation) and session 5 (test) as conversations and utterances.
EVAL_SPLITS = {"paper": {"val": (28, 1019), "test": (31, 1623)}, "tiny": {"val": (4, 20), "test": (4, 22)}}
LABELS = ["neutral", "happy", "sad", "angry", "excited", "frustrated"]


def build_store(root: Path, dims_name: str) -> None:
    """Writes the IEMOCAP-shaped store ``root/iemocap`` (train, val, test; speech and text)."""
    from bridges import init_store, write_index, write_modality

    dims = DIMS[dims_name]
    dataset = init_store(root, "iemocap", LABELS)
    splits = {"train": make_corpus(dims, seed=0)}
    for seed, (split, (conversations, utterances)) in enumerate(EVAL_SPLITS[dims_name].items(), start=1):
        splits[split] = make_corpus(dataclasses.replace(dims, num_conversations=conversations,
                                                        total_utterances=utterances), seed=10 * seed)
    for split, corpus in splits.items():
        conversation = np.repeat(np.arange(len(corpus.lengths)), corpus.lengths)
        write_index(dataset, split, [f"{split}-u{i}" for i in range(len(conversation))],
                    [f"{split}-c{c}" for c in conversation], corpus.labels)
        write_modality(dataset, split, "speech", corpus.speech)
        write_modality(dataset, split, "text", corpus.text)


def model_overrides(dims_name: str) -> list[str]:
    """``--set`` flags giving the iemocap preset the benchmark's model sizes (its own at paper dims)."""
    dims = DIMS[dims_name]
    keys = ("can_hidden", "gru_layers", "fusion_dim", "fusion_layers", "attention_dim", "attention_heads", "batch_size")
    flags = []
    for key in keys:
        flags += ["--set", f"{key}={getattr(dims, key)}"]
    return flags


def timed_run(root: Path, out: Path, epochs: int, cache: Path, dims_name: str, *flags: str) -> float:
    """Wall seconds of one training CLI run (a fresh interpreter, as a user starts it)."""
    cmd = [sys.executable, "-m", "mister_jax.train", "--dataset", "iemocap", "--features", str(root),
           "--out", str(out), "--epochs", str(epochs), "--quiet", "--jax-cache", str(cache),
           *model_overrides(dims_name), *flags]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE.parent, timeout=4 * 3600)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"training run {' '.join(cmd[2:])} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return seconds


def run(args) -> dict:
    with tempfile.TemporaryDirectory(prefix="mister-protocol-") as tmp:
        tmp = Path(tmp)
        build_store(tmp / "features", args.dims)
        cache = tmp / "jax-cache"
        cold = timed_run(tmp / "features", tmp / "cold", 1, cache, args.dims)
        warm = timed_run(tmp / "features", tmp / "warm", 1, cache, args.dims)
        longer = timed_run(tmp / "features", tmp / "longer", 1 + args.epochs, cache, args.dims)
        saving = timed_run(tmp / "features", tmp / "saving", 1 + args.epochs, cache, args.dims, "--checkpoint-every", "1")
        training = {name: float(np.mean([json.loads(line)["seconds"] for line in
                                         (tmp / name / "metrics.jsonl").read_text().splitlines()[1:]]))
                    for name in ("longer", "saving")}
    n = 1 + args.epochs
    epoch_s, saving_epoch_s = (longer - warm) / args.epochs, (saving - warm) / args.epochs
    checkpoint_s = saving_epoch_s - epoch_s
    saves = int((PROTOCOL_EPOCHS - 1) * epoch_s // (60 * CHECKPOINT_MINUTES))
    return {"dims": args.dims, "extra_epochs": args.epochs, "seeds": 3, "machine": machine_info(),
            "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
            "run_1_epoch_cold_s": cold, "run_1_epoch_warm_s": warm, f"run_{n}_epochs_warm_s": longer,
            f"run_{n}_epochs_warm_checkpoint_every_epoch_s": saving,
            "epoch_s": epoch_s, "epoch_training_s": training["longer"], "epoch_rest_s": epoch_s - training["longer"],
            "epoch_with_checkpoint_s": saving_epoch_s, "epoch_with_checkpoint_training_s": training["saving"],
            "checkpoint_s": checkpoint_s, "checkpoints_written": saves + 1,
            "protocol_hours": (cold + (PROTOCOL_EPOCHS - 1) * epoch_s + saves * checkpoint_s) / 3600,
            "protocol_hours_checkpoint_every_epoch": (cold + (PROTOCOL_EPOCHS - 1) * saving_epoch_s) / 3600,
            "basis": f"cold 1-epoch run + {PROTOCOL_EPOCHS - 1} x one epoch (3 seeds: training, validation) + "
                     f"one checkpoint's cost per {CHECKPOINT_MINUTES:g} minutes of those epochs (the default "
                     f"schedule; the last checkpoint is in the cold run); one epoch = (warm {n}-epoch run - warm "
                     f"1-epoch run) / {args.epochs}, a checkpoint's cost = the same with --checkpoint-every 1 "
                     f"minus that"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dims", choices=sorted(DIMS), default="paper", help="paper (default) or tiny (smoke test)")
    parser.add_argument("--epochs", type=int, default=2, help="extra epochs of the longer run (default 2)")
    parser.add_argument("--out", default=str(RESULTS_DIR / "protocol.json"), help="results JSON file")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error("--epochs must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args)
    for key, value in result.items():
        if key not in ("machine", "basis"):
            print(f"{key}: {value:.3f}" if isinstance(value, float) else f"{key}: {value}")
    print(f"basis: {result['basis']}")
    print(f"target protocol<=3h: {'met' if result['protocol_hours'] <= 3 else 'NOT met'}")
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
