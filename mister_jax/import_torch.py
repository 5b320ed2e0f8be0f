"""Import a checkpoint trained with the authors' public code (iiscleap/MiSTER-E, `AttentionMoE`) as a run.

    python -m mister_jax.import_torch CHECKPOINT.pth --dataset NAME [--features ROOT] --out RUN_DIR
        [--attention-heads 3] [--gate-temperature 2]

The run directory it writes (`run_config.json`, one seed's parameters under `checkpoints/best/seed_0`)
is read by `python -m mister_jax.predict --run RUN_DIR`, so a model trained with the authors' scripts
can predict, have its gate analysed and be compared with our runs.

The `.pth` file is read by `mister_jax.torch_checkpoint.read_state_dict`, without torch and without
running any of its pickle (no fallback to `torch.load`); `mister_jax.torch_layout` maps its keys onto
our parameters (the number of heads and the gate's temperature are flags: a `state_dict` lacks them).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
from pathlib import Path

from mister_jax import atomic
from mister_jax.checkpoint import RunCheckpoints
from mister_jax.configs import get_config
from mister_jax.errors import UsageError
from mister_jax.input_pipeline import open_store
from mister_jax.torch_checkpoint import CheckpointFormatError, read_state_dict
from mister_jax.torch_layout import UNUSED_PREFIXES, params_from_state_dict

__all__ = ["CheckpointFormatError", "main", "params_from_state_dict", "read_state_dict"]

__all__ = ["CheckpointFormatError", "UNUSED_PREFIXES", "main", "params_from_state_dict", "read_state_dict"]


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m mister_jax.import_torch", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a torch.save'd state_dict of the authors' AttentionMoE (moe_model.pth)")
    parser.add_argument("--dataset", required=True, help="store name whose labels and dims the model must match")
    parser.add_argument("--features", default="features", help="store root; the store is ROOT/NAME")
    parser.add_argument("--out", required=True, help="run directory to write")
    parser.add_argument("--attention-heads", type=int, default=3, help="heads of every attention (theirs: 3)")
    parser.add_argument(
        "--gate-temperature", type=float, default=2.0, help="softmax temperature of the gate (theirs: 2)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        _main(args)
    except UsageError as err:
        for line in str(err).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 2
    return 0


def _refuse_a_trained_run(out: Path) -> None:
    """Raises `UsageError` when ``out`` holds a run that was not imported: its results, history and other
    seeds' checkpoints would stay beside the imported parameters. An earlier import is overwritten."""
    run_config = out / "run_config.json"
    if not run_config.exists():
        return
    try:
        imported = "imported_from" in json.loads(run_config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        imported = False
    if not imported:
        raise UsageError(f"--out {out}: holds a run that was not imported ({run_config}); import into a new folder")


def _main(args) -> None:
    path = Path(args.checkpoint)
    try:
        sd = read_state_dict(path)
        cfg, params = params_from_state_dict(sd, args.attention_heads, args.gate_temperature)
    except OSError as err:
        raise UsageError(f"{path}: cannot be read ({err.strerror or err})") from None
    except CheckpointFormatError as err:
        raise UsageError("\n".join(f"{path}: {line}" for line in str(err).splitlines())) from None
    store = open_store(args.dataset, args.features)
    mismatch = [
        f"{store.directory / 'manifest.json'}: {name} {have} but the checkpoint's model has {need}"
        for name, have, need in (
            ("speech dim", store.modalities.get("speech", {}).get("dim"), cfg.speech_dim),
            ("text dim", store.modalities.get("text", {}).get("dim"), cfg.text_dim),
            ("label count", len(store.label_names), cfg.num_classes),
        )
        if have != need
    ]
    if mismatch:
        raise UsageError("\n".join(mismatch) + "\n(use the store whose features the checkpoint was trained on)")
    config = get_config(args.dataset, store.label_names, "authors-code")
    out = Path(args.out)
    _refuse_a_trained_run(out)
    out.mkdir(parents=True, exist_ok=True)
    train = dataclasses.replace(config.train, seeds=1)
    atomic.write_json(
        out / "run_config.json",
        {
            "dataset": args.dataset,
            "store": str(store.directory.resolve()),
            "label_names": list(store.label_names),
            "val_source": "imported",
            "model": dataclasses.asdict(cfg),
            "loss": dataclasses.asdict(config.loss),
            "train": dataclasses.asdict(train),
            "imported_from": {
                "path": str(path.resolve()),
                "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                "format": "the authors' AttentionMoE state_dict (iiscleap/MiSTER-E)",
            },
        },
    )
    ckpt = RunCheckpoints(out / "checkpoints")
    ckpt.save_best(0, 0, params)
    ckpt.close()
    ignored = sorted(k for k in sd if k.startswith(UNUSED_PREFIXES))
    print(
        f"imported {path} into {out} ({len(sd)} tensors; unused keys of their AttentionMoE ignored: "
        f"{', '.join(ignored) or 'none'}); predict with "
        f"python -m mister_jax.predict --run {out} --dataset {args.dataset} --out predictions.jsonl",
        file=sys.stderr,
    )


if __name__ == "__main__":
    sys.exit(main())
