"""Train MiSTER-E on a feature store with the paper's protocol (DESIGN §5, §6).

    python -m mister_jax.train --dataset NAME [--features ROOT] [--out DIR] [--epochs N] [--seeds K]
        [--variant V] [--preset {paper,authors-code}] [--set key=value ...] [--seed-mode {auto,vmap,sequential}]
        [--no-val {carve,refuse}] [--checkpoint-every N] [--checkpoint-minutes M] [--restart]
        [--protocol {standard,loso}] [--devices N]
        [--coordinator-address HOST:PORT --num-processes P --process-id I]

Without arguments it trains on the built-in demo store (built under ``features/demo`` if absent).
Each seed keeps the parameters of its best validation weighted F1 (MoE prediction), scored on test once
training ends (``--set test_every_epoch=true`` also evaluates test after every epoch, for learning
curves). Writes to ``DIR``: ``results.json`` (DESIGN §6 plus per-expert, per-class, confusion and gate
statistics), ``metrics.jsonl``, ``report.md`` with PNG figures, ``run_config.json`` and ``checkpoints/``
(`mister_jax.checkpoint`), written once 10 minutes have passed since the last one and after the last
epoch (``--checkpoint-minutes``, ``--checkpoint-every``). Re-running the same command resumes from the
last checkpoint and ends with the same scores as an uninterrupted run.

``--protocol loso`` trains IEMOCAP's leave-one-session-out folds instead, each a run in ``DIR/fold_K``,
and writes their aggregate to ``DIR`` (`mister_jax.folds`, ``docs/LOSO.md``).

``--devices N`` trains on N devices of this process (default: all), the seeds split over them and,
when there are more devices than seeds, the batches too (`mister_jax.sharding`); the results do not
depend on N beyond float rounding. ``--coordinator-address``, ``--num-processes`` and ``--process-id``
start one process of a multi-host run (``docs/MULTI_HOST.md``): every host reads the store, process 0
alone writes the run directory, which must be on a filesystem every host shares.

On a GPU or TPU the matmuls and convolutions run in bfloat16 (``--set dtype=float32`` keeps float32);
the parameters, the optimizer and the losses are float32 everywhere. The library call behind this
command is `mister_jax.train.train_and_evaluate`.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import tempfile
from pathlib import Path

import jax

from mister_jax import folds, loso
from mister_jax.config import VARIANTS, Config
from mister_jax.configs import STYLES, get_config
from mister_jax.configs.overrides import OverrideError, apply_overrides
from mister_jax.errors import UsageError
from mister_jax.input_pipeline import open_store
from mister_jax.runtime.compile_cache import DEFAULT_CACHE, enable_compilation_cache
from mister_jax.seeds import SEED_MODES
from mister_jax.sharding import check_devices, initialize_distributed, primary_process
from mister_jax.train import train_and_evaluate


def training_parser(prog: str = "python -m mister_jax.train", description: str = __doc__) -> argparse.ArgumentParser:
    """The training command's flags (`mister_jax.sweep` adds its own to them)."""
    parser = argparse.ArgumentParser(prog=prog, description=description.split("\n\n")[0])
    parser.add_argument("--dataset", default="demo", help="preset and store name (default: demo)")
    parser.add_argument("--features", default="features", help="store root; the store is ROOT/NAME")
    parser.add_argument("--out", help="run directory (default: runs/NAME[-VARIANT])")
    parser.add_argument("--epochs", type=int, help="override the preset's epochs")
    parser.add_argument("--seeds", type=int, help="number of seeds 0..K-1 (default 3)")
    parser.add_argument("--variant", help="mister-e, feat-moe, no-loss-moe, monolithic or text-only")
    parser.add_argument(
        "--preset",
        choices=STYLES,
        default="paper",
        help="paper (default): the paper's model and losses; authors-code: what the authors' "
        "public code trains (3 heads, MLP gate at temperature 2, batch-pooled contrastive "
        "loss, symmetric KL, no CAN dropout, fully random batches), selected on validation",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any ModelConfig / LossConfig / TrainConfig field, e.g. lambda_con=0",
    )
    parser.add_argument(
        "--seed-mode",
        choices=SEED_MODES,
        default="auto",
        help="train seeds in one vmapped step or in separate steps, in turn (auto: vmap on GPU/TPU)",
    )
    parser.add_argument(
        "--no-val",
        choices=("carve", "refuse"),
        default="carve",
        help="when the store has no val split: carve one from train (fixed seed) or stop",
    )
    parser.add_argument(
        "--checkpoint-every", type=int, help="save the training state every N epochs (default: by time)"
    )
    parser.add_argument(
        "--checkpoint-minutes",
        type=float,
        help="save it once M minutes have passed since the last save (default 10; 0: off)",
    )
    parser.add_argument(
        "--on-nonfinite",
        choices=("stop", "skip-step"),
        help="a step whose loss or gradient is NaN/inf: stop the run (default, exit 2, the last "
        "good checkpoint kept) or skip the step and count it",
    )
    parser.add_argument("--restart", action="store_true", help="discard this run's checkpoints and start over")
    parser.add_argument(
        "--jax-cache",
        default=os.environ.get("MISTER_JAX_CACHE", str(DEFAULT_CACHE)),
        help="persistent compilation cache (default: $MISTER_JAX_CACHE or ~/.cache/mister/jax)",
    )
    parser.add_argument(
        "--devices",
        type=int,
        help="devices of this process to train on (default: all); seeds are split over them, and "
        "batches too when there are more devices than seeds (docs/MULTI_HOST.md)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = training_parser()
    parser.add_argument(
        "--protocol",
        choices=("standard", "loso"),
        default="standard",
        help="standard (default): the store's train / val / test splits; loso: IEMOCAP "
        "leave-one-session-out, five folds into OUT/fold_K and their aggregate "
        "(mister_jax.folds, docs/LOSO.md)",
    )
    hosts = parser.add_argument_group("multi-host (docs/MULTI_HOST.md; default: one process)")
    hosts.add_argument("--coordinator-address", help="HOST:PORT of process 0, the same for every process")
    hosts.add_argument("--num-processes", type=int, help="how many processes (one per host) the run has")
    hosts.add_argument("--process-id", type=int, help="this process's index, 0 .. P-1 (0 writes the run)")
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace, label_names) -> Config:
    """The dataset's preset with the store's labels, then --variant, --set and the flags; on a GPU or TPU
    the matmuls and convolutions run in bfloat16 unless ``--set dtype=...`` says otherwise."""
    overrides = list(args.overrides)
    if args.variant is not None:
        if args.variant not in VARIANTS:
            raise UsageError(f"--variant {args.variant}: unknown variant; choose one of {', '.join(VARIANTS)}")
        overrides.insert(0, f"variant={args.variant}")
    flags = {
        "epochs": args.epochs,
        "seeds": args.seeds,
        "checkpoint_every": args.checkpoint_every,
        "checkpoint_minutes": args.checkpoint_minutes,
        "on_nonfinite": args.on_nonfinite,
    }
    for name, least in (("epochs", 1), ("seeds", 1), ("checkpoint_every", 0), ("checkpoint_minutes", 0)):
        if flags[name] is not None and flags[name] < least:
            raise UsageError(f"--{name.replace('_', '-')} {flags[name]}: must be >= {least}")
    overrides += [f"train.{k}={v}" for k, v in flags.items() if v is not None]
    if jax.default_backend() != "cpu" and not any(o.split("=", 1)[0].rpartition(".")[2] == "dtype" for o in overrides):
        overrides.insert(0, "dtype=bfloat16")
    try:
        return apply_overrides(get_config(args.dataset, label_names, args.preset), overrides)
    except OverrideError as err:
        raise UsageError(str(err)) from None
    except ValueError as err:
        raise UsageError(f"--set: {err}") from None


def prepare_out(args: argparse.Namespace) -> Path:
    """The run directory (``--out``, or ``runs/NAME[-VARIANT][-PRESET]``), checked to be writable; it is
    not created here (`train_and_evaluate` creates it once the store's splits pass), so a run refused
    for its input leaves no directory behind."""
    suffix = (f"-{args.variant}" if args.variant else "") + ("" if args.preset == "paper" else f"-{args.preset}")
    suffix += "-loso" if getattr(args, "protocol", "standard") == "loso" else ""
    out = Path(args.out) if args.out else Path("runs") / (args.dataset + suffix)
    try:
        existing = next(p for p in (out, *out.parents) if p.exists() or p.is_symlink())
        if not existing.is_dir():
            code = errno.EEXIST if existing == out else errno.ENOTDIR
            raise OSError(code, os.strerror(code), str(existing))
        tempfile.TemporaryDirectory(prefix=".write-test-", dir=existing).cleanup()  # creating there works
    except OSError as err:
        raise UsageError(f"--out {out}: cannot write there ({err.strerror}) — choose a writable directory") from None
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    try:
        initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
        check_devices(args.devices)
        if args.protocol == "loso":
            return _loso(args, log)
        store = open_store(args.dataset, args.features)
        config = config_from_args(args, store.label_names)
        out = prepare_out(args)
        results = train_and_evaluate(config, store, out, no_val=args.no_val, **run_options(args, log))
    except UsageError as err:
        for line in str(err).splitlines():
            log(f"error: {line}")
        return 2
    except KeyboardInterrupt:
        log("interrupted — rerun the same command to resume from the last checkpoint")
        return 130
    t = results["test"]
    experts = ", ".join(f"{e} {100 * v['weighted_f1']['mean']:.1f}" for e, v in t["experts"].items())
    written = f"wrote {out / 'results.json'} and {out / 'report.md'}" if primary_process() else "process 0 wrote them"
    log(
        f"test weighted F1 {100 * t['weighted_f1']['mean']:.1f} ± {100 * t['weighted_f1']['std']:.1f} ({experts}); "
        f"{written}"
    )
    return 0


def run_options(args: argparse.Namespace, log) -> dict:
    """The keyword arguments of `train_and_evaluate` that the training flags set (sweeps share them)."""
    return dict(
        dataset=args.dataset,
        seed_mode=args.seed_mode,
        devices=args.devices,
        restart=args.restart,
        cache_dir=enable_compilation_cache(args.jax_cache),
        progress=not args.quiet,
        log=log,
    )


def _loso(args: argparse.Namespace, log) -> int:
    """``--protocol loso``: every fold of `mister_jax.loso.train_loso` (UsageError is the caller's)."""
    stores = folds.open_fold_stores(args.features, args.dataset)
    config = config_from_args(args, next(iter(stores.values())).label_names)
    out = prepare_out(args)
    results = loso.train_loso(config, stores, out, **run_options(args, log))
    t = results["test"]
    experts = ", ".join(f"{e} {100 * v['mean']:.1f}" for e, v in t["experts"].items())
    log(
        f"leave-one-session-out test weighted F1 {100 * t['weighted_f1']['mean']:.1f} ± "
        f"{100 * t['weighted_f1']['std']:.1f} over {len(results['folds'])} folds × {len(results['seeds'])} seed(s) "
        f"({experts}); wrote {out / 'results.json'} and {out / 'report.md'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
