"""The IEMOCAP protocol through `python -m mister_jax.train`, end to end: what 100 epochs × 3 seeds cost.

    .venv/bin/python benchmarks/protocol.py [--dims paper|tiny] [--epochs N] [--set KEY=VALUE ...]

Builds an IEMOCAP-shaped feature store: the 92 training conversations of `train_epoch.py` (4,791
utterances), a validation split like session 1 (28 conversations, 1,019 utterances) and a test split
like session 5 (31 conversations, 1,623 utterances); 2048-d Gaussian speech and text, 6 classes. Then
it runs the training CLI with the iemocap preset as a user would (3 seeds interleaved on CPU, the test
split scored once at the end, the report) three times on one compilation cache: 1 epoch cold, then
1 + N epochs warm twice: with the default checkpoints (every 10 minutes, so none before the end of so
short a run) and with a checkpoint after every epoch (``--checkpoint-every 1``).

The trainer times every epoch (``metrics.jsonl``): its training pass, validation and selection, and
the checkpoint's blocking part (waiting for the previous write, host copies); a background write
shows up in the next training pass. One epoch of the protocol is the mean of epochs 2 .. 1 + N of
the default run; a checkpoint's cost is the same mean in the other run minus that. The protocol is
the cold run's wall time (start, compile, init, one epoch, checkpoint, test, report) plus 99 epochs
plus one checkpoint per 10 minutes of them; with a checkpoint every epoch, 99 epochs of the other
run.
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

from mister_jax.config import TrainConfig  # noqa: E402

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
        splits[split] = make_corpus(
            dataclasses.replace(dims, num_conversations=conversations, total_utterances=utterances), seed=10 * seed
        )
    for split, corpus in splits.items():
        conversation = np.repeat(np.arange(len(corpus.lengths)), corpus.lengths)
        write_index(
            dataset,
            split,
            [f"{split}-u{i}" for i in range(len(conversation))],
            [f"{split}-c{c}" for c in conversation],
            corpus.labels,
        )
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


def timed_run(
    root: Path, out: Path, epochs: int, cache: Path, dims_name: str, overrides: list[str], *flags: str
) -> float:
    """Wall seconds of one training CLI run (a fresh interpreter, as a user starts it)."""
    cmd = [
        sys.executable,
        "-m",
        "mister_jax.train",
        "--dataset",
        "iemocap",
        "--features",
        str(root),
        "--out",
        str(out),
        "--epochs",
        str(epochs),
        "--quiet",
        "--jax-cache",
        str(cache),
        *model_overrides(dims_name),
        *[f for item in overrides for f in ("--set", item)],
        *flags,
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE.parent, timeout=4 * 3600)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"training run {' '.join(cmd[2:])} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return seconds


def epoch_seconds(run_dir: Path, last_checkpoint: bool) -> dict:
    """Mean wall seconds per epoch after the first (the trainer's ``metrics.jsonl``): training pass,
    validation and selection, checkpoint (the last epoch's unless ``last_checkpoint`` is False)."""
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][1:]
    checkpoint = [h["checkpoint_seconds"] for h in history]
    if not last_checkpoint:
        checkpoint[-1] = 0.0
    parts = {
        "training": float(np.mean([h["seconds"] for h in history])),
        "validation": float(np.mean([h["validation_seconds"] for h in history])),
        "checkpoint": float(np.mean(checkpoint)),
    }
    return {**parts, "epoch": sum(parts.values())}


def run(args) -> dict:
    with tempfile.TemporaryDirectory(prefix="mister-protocol-") as tmp:
        tmp = Path(tmp)
        build_store(tmp / "features", args.dims)
        cache = tmp / "jax-cache"
        cold = timed_run(tmp / "features", tmp / "cold", 1, cache, args.dims, args.overrides)
        timed_run(tmp / "features", tmp / "longer", 1 + args.epochs, cache, args.dims, args.overrides)
        timed_run(
            tmp / "features",
            tmp / "saving",
            1 + args.epochs,
            cache,
            args.dims,
            args.overrides,
            "--checkpoint-every",
            "1",
        )
        # The default run's last checkpoint is the one every run ends with, counted in the cold run.
        default, every = epoch_seconds(tmp / "longer", last_checkpoint=False), epoch_seconds(tmp / "saving", True)
    checkpoint_s = every["epoch"] - default["epoch"]
    saves = int((PROTOCOL_EPOCHS - 1) * default["epoch"] // (60 * CHECKPOINT_MINUTES))
    return {
        "dims": args.dims,
        "extra_epochs": args.epochs,
        "seeds": 3,
        "overrides": args.overrides,
        "machine": machine_info(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "run_1_epoch_cold_s": cold,
        "epoch_s": default["epoch"],
        "epoch_training_s": default["training"],
        "epoch_validation_s": default["validation"],
        "epoch_with_checkpoint_s": every["epoch"],
        "epoch_with_checkpoint_training_s": every["training"],
        "epoch_with_checkpoint_copies_s": every["checkpoint"],
        "checkpoint_s": checkpoint_s,
        "checkpoints_written": saves + 1,
        "protocol_hours": (cold + (PROTOCOL_EPOCHS - 1) * default["epoch"] + saves * checkpoint_s) / 3600,
        "protocol_hours_checkpoint_every_epoch": (cold + (PROTOCOL_EPOCHS - 1) * every["epoch"]) / 3600,
        "basis": f"cold 1-epoch run (start, compile, init, 1 epoch, checkpoint, test, report) + "
        f"{PROTOCOL_EPOCHS - 1} x one epoch (3 seeds: training, validation) + one checkpoint's cost "
        f"per {CHECKPOINT_MINUTES:g} minutes of those epochs (the default schedule); epochs 2-{1 + args.epochs} "
        f"of warm runs timed by the trainer, a checkpoint's cost = an epoch with --checkpoint-every 1 "
        f"(its copies and its write's toll on the next training pass) minus one without",
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dims", choices=sorted(DIMS), default="paper", help="paper (default) or tiny (smoke test)")
    parser.add_argument("--epochs", type=int, default=2, help="extra epochs of the longer run (default 2)")
    parser.add_argument("--out", default=str(RESULTS_DIR / "protocol.json"), help="results JSON file")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="passed on to every training run (e.g. dtype=bfloat16)",
    )
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
