"""Training-epoch benchmark: the PyTorch way against our JAX training step, side by side.

    .venv/bin/python benchmarks/train_epoch.py [--dims paper|tiny] [--epochs N] [--variants a,b,c]

On IEMOCAP-shaped synthetic data (92 training conversations, 4,791 utterances, 2048-d speech and
text, 6 classes, batch 8; `benchmarks/common.py`) it times, each in its own subprocess so that peak
RSS is per variant:

  a     the eager PyTorch reference with the authors' architecture and key layout
        (`benchmarks/torch_reference.py`: their AttentionMoE with their 3 heads where the attention width
        divides by 3, the dims' heads otherwise; no masks in the model), each batch padded
        to its longest conversation, conversations shuffled per epoch, the losses reduced as their
        `train_moe.py` reduces them, padded positions included (the authors' way);
  b     our training epoch, 1 seed, through the trainer's own pieces (`mister_jax.batching.BatchPlanner`,
        `mister_jax.seeds.SeedStates`, `mister_jax.trainer.train_epoch`) with its default batching
        (bucketed: random per seed and epoch, pools sorted by length); run twice on one fresh
        persistent compilation cache: `b-cold` (init + compile only) then `b` (warm compile + epochs);
  c     3 seeds: `c-vmap` (one vmapped step) and `c-int` (the seeds stepped in turn: step i of every
        seed before step i + 1, the trainer's default on a CPU);
  s     b with `batching="shuffled"` (random batch composition within length buckets): the
        padding lever measured end to end;
  f     b with bfloat16 matmuls and convolutions (`--set dtype=bfloat16`; parameters, optimizer and
        losses stay float32): what a CPU with AVX-512 BF16 gains from them.

Warm-up before the timed epochs: two batches (PyTorch) or one step per compiled shape (JAX).
Every epoch's batches are gathered on the host and put on the device before its first step (the
gather is inside the timing); no host synchronisation happens between steps of an epoch.
Prints one line per figure and writes benchmarks/results/train_epoch.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from common import (  # noqa: E402  # noqa: E402
    DIMS,
    RESULTS_DIR,
    authors_batches,
    emit,
    machine_info,
    make_corpus,
    pad_batch,
    padded_utterances,
    parse_result,
    peak_rss_mib,
    write_result,
)

VARIANTS = ("a", "b", "c", "s", "f")
PROTOCOL_EPOCHS, PROTOCOL_SEEDS = 100, 3
# IEMOCAP 6-class: 7,433 utterances, of which the benchmark's training split holds 4,791 and the test
# split (session 5) 1,623; the validation split (session 1) holds the other 1,019. The trainer scores
# every seed on validation after every epoch, and its best parameters on test once at the end.
PROTOCOL_TEST_UTTERANCES = 1623
PROTOCOL_VAL_UTTERANCES = 7433 - 4791 - PROTOCOL_TEST_UTTERANCES


# ----------------------------------------------------------------------------------------------------
# (a) the PyTorch way


def run_torch(args) -> dict:
    """Eager PyTorch reference: init, two warm-up batches, then `epochs` timed epochs."""
    import torch
    from torch_reference import AUTHORS_HEADS, MisterE, train_step

    if args.threads:
        torch.set_num_threads(args.threads)
    dims = DIMS[args.dims]
    corpus = make_corpus(dims)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    heads = AUTHORS_HEADS if dims.attention_dim % AUTHORS_HEADS == 0 else dims.attention_heads
    model = MisterE(dims, heads=heads)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)
    init_s = time.perf_counter() - t0

    def run(batch):
        tensors = [torch.from_numpy(x) for x in pad_batch(corpus, batch)]
        return train_step(model, optimizer, *tensors, reduction="authors")

    rng = np.random.default_rng(0)
    for batch in authors_batches(corpus.lengths, dims.batch_size, rng)[:2]:
        run(batch)
    epoch_s, epoch_cpu_s, padded, losses = [], [], [], []
    for epoch in range(args.epochs):
        batches = authors_batches(corpus.lengths, dims.batch_size, np.random.default_rng([1, epoch]))
        t0, c0 = time.perf_counter(), time.process_time()
        losses += [run(batch) for batch in batches]
        epoch_s.append(time.perf_counter() - t0)
        epoch_cpu_s.append(time.process_time() - c0)
        padded.append(padded_utterances(batches, corpus.lengths))
    real = int(corpus.lengths.sum())
    return {
        "variant": args.tag,
        "framework": "torch",
        "threads": torch.get_num_threads(),
        "seeds": 1,
        "attention_heads": heads,
        "init_s": init_s,
        "compile_s": 0.0,
        "num_shapes": None,
        "epoch_s": epoch_s,
        "epoch_cpu_s": epoch_cpu_s,
        "real_utterances": real,
        "padded_utterances": float(np.mean(padded)),
        "padding_efficiency": real / float(np.mean(padded)),
        "params": sum(p.numel() for p in model.parameters()),
        "final_loss": losses[-1] if losses else None,
        "peak_rss_mib": peak_rss_mib(),
    }


# ----------------------------------------------------------------------------------------------------
# (b), (c) our JAX step


def split_data(corpus):
    """The synthetic corpus as a `mister_jax.input_pipeline.SplitData` (what the trainer loads from a store)."""
    from mister_jax.input_pipeline import SplitData

    n = len(corpus.labels)
    conv = np.repeat(np.arange(len(corpus.lengths)), corpus.lengths)
    return SplitData(
        name="train",
        features={"speech": corpus.speech, "text": corpus.text},
        labels=corpus.labels,
        utterance_ids=np.array([f"u{i}" for i in range(n)]),
        conversation_ids=np.array([f"c{i}" for i in conv]),
        starts=corpus.starts,
        lengths=corpus.lengths,
    )


def iemocap_config(dims, dtype: str, batching: str | None):
    """The IEMOCAP preset (`mister_jax.configs.iemocap`) at the benchmark's dims."""
    from mister_jax.configs import get_config

    config = get_config("iemocap")
    model = dataclasses.replace(
        config.model,
        speech_dim=dims.speech_dim,
        text_dim=dims.text_dim,
        num_classes=dims.num_classes,
        can_hidden=dims.can_hidden,
        gru_layers=dims.gru_layers,
        fusion_dim=dims.fusion_dim,
        fusion_layers=dims.fusion_layers,
        attention_dim=dims.attention_dim,
        attention_heads=dims.attention_heads,
        dtype=dtype,
    )
    train = dataclasses.replace(
        config.train, batch_size=dims.batch_size, **({"batching": batching} if batching else {})
    )
    return dataclasses.replace(config, model=model, train=train)


def run_jax(args) -> dict:
    """The trainer's own pieces: its `BatchPlanner`, `SeedStates` (compile every training shape before
    the states exist, initialise) and `mister_jax.trainer.train_epoch`; one warm-up step per shape, then
    the timed epochs."""
    from mister_jax.batching import BatchPlanner, padding_efficiency
    from mister_jax.evaluate import Evaluator
    from mister_jax.input_pipeline import batch_rows, make_batch
    from mister_jax.params import count_params, param_shapes
    from mister_jax.runtime.compile_cache import enable_compilation_cache
    from mister_jax.seeds import SeedStates
    from mister_jax.trainer import train_epoch

    if args.cache_dir:
        enable_compilation_cache(args.cache_dir)
    dims = DIMS[args.dims]
    config = iemocap_config(dims, args.dtype, args.batching)
    train_cfg = config.train
    data = split_data(make_corpus(dims))
    seeds = SeedStates(config.model, config.loss, train_cfg, range(args.seeds), args.mode, args.cache_dir)
    planner = BatchPlanner.create(train_cfg, data.lengths, [data.lengths])
    first = planner.train_epoch(data.lengths, seeds.seeds, 0, seeds.aligned)[0]
    shapes = planner.train_shapes(first)
    t0 = time.perf_counter()
    for t in shapes:
        seeds.compile(make_batch(data, batch_rows(data, planner.example(data.lengths, t))))
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    seeds.initialise()
    init_s = time.perf_counter() - t0

    record = {
        "variant": args.tag,
        "framework": "jax",
        "mode": args.mode,
        "batching": train_cfg.batching,
        "seeds": args.seeds,
        "init_s": init_s,
        "compile_s": compile_s,
        "num_shapes": len(shapes),
        "shapes": [[train_cfg.batch_size, t] for t in shapes],
        "pad_lengths": list(planner.train_pads),
        "params": count_params(param_shapes(config.model)),
    }
    if args.compile_only:
        record.update(epoch_s=[], peak_rss_mib=peak_rss_mib())
        return record

    # Warm-up: one step per shape of epoch 0 (the first use of each executable).
    plans = planner.train_epoch(data.lengths, seeds.seeds, 0, seeds.aligned)
    warm, seen = [], set()
    for step in zip(*plans):
        if step[0].length not in seen:
            seen.add(step[0].length)
            warm.append([make_batch(data, batch_rows(data, p)) for p in step])
    seeds.train_epoch(warm)
    del warm

    epoch_s, epoch_cpu_s, losses = [], [], []
    for epoch in range(1, args.epochs + 1):
        c0 = time.process_time()
        metrics, seconds = train_epoch(seeds, planner, data, epoch)
        losses = np.asarray([[m["loss"] for m in per_seed] for per_seed in metrics])  # [K, steps]
        epoch_s.append(seconds)
        epoch_cpu_s.append(time.process_time() - c0)
    real = int(data.lengths.sum())
    padded = sum(len(p.conversations) * p.length for p in first)
    if args.seeds == 1 and args.epochs:  # the evaluation rate (b, s): what the protocol estimate needs
        evaluator = Evaluator(seeds, planner, {"val": data}, [str(c) for c in range(dims.num_classes)])
        evaluator.predict("val", seeds.params())  # compiles every evaluation shape
        t0 = time.perf_counter()
        evaluator.predict("val", seeds.params())
        record.update(eval_utterances_per_s=real / (time.perf_counter() - t0))
    record.update(
        epoch_s=epoch_s,
        epoch_cpu_s=epoch_cpu_s,
        real_utterances=real,
        padded_utterances=padded,
        padding_efficiency=padding_efficiency(data.lengths, first),
        final_loss=float(np.mean(losses[:, -1])) if losses.size else None,
        loss_finite=bool(np.all(np.isfinite(losses))),
        peak_rss_mib=peak_rss_mib(),
    )
    return record


# ----------------------------------------------------------------------------------------------------
# orchestration


def worker_command(args, tag: str, **extra) -> list[str]:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        tag,
        "--dims",
        args.dims,
        "--epochs",
        str(args.epochs),
    ]
    for name, value in extra.items():
        flag = "--" + name.replace("_", "-")
        cmd += [flag] if value is True else [flag, str(value)]
    return cmd


def run_worker(cmd: list[str], timeout: float) -> dict:
    """Runs one variant in a fresh interpreter and returns its RESULT record (wall time added)."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=HERE.parent)
    if proc.returncode != 0:
        raise RuntimeError(
            f"benchmark worker {' '.join(cmd[2:])} failed (exit {proc.returncode}):\n" + proc.stderr[-3000:]
        )
    record = parse_result(proc.stdout)
    record["process_wall_s"] = time.perf_counter() - t0
    return record


def summarize(record: dict) -> dict:
    """Adds seconds/epoch (mean over timed epochs) and real utterances/s (over all seeds)."""
    if record.get("epoch_s"):
        sec = float(np.mean(record["epoch_s"]))
        record["seconds_per_epoch"] = sec
        record["real_utterances_per_s"] = record["seeds"] * record["real_utterances"] / sec
        if record.get("epoch_cpu_s"):  # process CPU seconds per wall second while training (2 = both cores)
            record["cores_busy"] = float(np.mean(record["epoch_cpu_s"])) / sec
    return record


def run_all(args) -> dict:
    """Runs the requested variants (rounds interleave them) and derives the ratios and estimates."""
    wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in wanted if v not in VARIANTS]
    if unknown:
        raise SystemExit(
            f"benchmarks/train_epoch.py: --variants {','.join(unknown)} unknown; use a subset of {','.join(VARIANTS)}."
        )
    timeout = 3600.0
    rounds = []
    for _ in range(args.rounds):
        runs = {}
        cache = tempfile.mkdtemp(prefix="mister-jax-cache-")
        try:
            if "a" in wanted:
                runs["a"] = run_worker(worker_command(args, "a", threads=args.threads), timeout)
            if ("b" in wanted or "c" in wanted) and not args.skip_cold:
                runs["b-cold"] = run_worker(
                    worker_command(args, "b-cold", mode="sequential", seeds=1, cache_dir=cache, compile_only=True),
                    timeout,
                )
            if "b" in wanted:
                runs["b"] = run_worker(worker_command(args, "b", mode="sequential", seeds=1, cache_dir=cache), timeout)
            if "c" in wanted:
                runs["c-vmap"] = run_worker(
                    worker_command(args, "c-vmap", mode="vmap", seeds=3, cache_dir=cache), timeout
                )
                runs["c-int"] = run_worker(
                    worker_command(args, "c-int", mode="sequential", seeds=3, cache_dir=cache), timeout
                )
            if "s" in wanted:
                runs["s"] = run_worker(
                    worker_command(args, "s", mode="sequential", seeds=1, cache_dir=cache, batching="shuffled"), timeout
                )
            if "f" in wanted:
                runs["f"] = run_worker(
                    worker_command(args, "f", mode="sequential", seeds=1, cache_dir=cache, dtype="bfloat16"), timeout
                )
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        rounds.append({k: summarize(v) for k, v in runs.items()})
    return derive(args, rounds)


def _median(rounds, tag, key):
    values = [r[tag][key] for r in rounds if tag in r and r[tag].get(key) is not None]
    return float(np.median(values)) if values else None


def derive(args, rounds) -> dict:
    """The headline figures: medians over rounds, ratios, targets and the 100-epoch × 3-seed estimate."""
    tags = sorted({t for r in rounds for t in r})
    med = {
        t: {
            k: _median(rounds, t, k)
            for k in (
                "seconds_per_epoch",
                "real_utterances_per_s",
                "compile_s",
                "init_s",
                "peak_rss_mib",
                "padding_efficiency",
                "cores_busy",
                "num_shapes",
                "eval_utterances_per_s",
                "padded_utterances",
            )
        }
        for t in tags
    }
    out = {
        "dims": args.dims,
        "epochs_timed": args.epochs,
        "rounds": rounds,
        "median": med,
        "machine": machine_info(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }
    a, b = med.get("a", {}), med.get("b", {})
    ratios = {}
    if a.get("real_utterances_per_s") and b.get("real_utterances_per_s"):
        ratios["b_over_a_real_utt_per_s"] = b["real_utterances_per_s"] / a["real_utterances_per_s"]
    if b.get("real_utterances_per_s") and med.get("s", {}).get("real_utterances_per_s"):
        ratios["b_sorted_over_s_shuffled_real_utt_per_s"] = (
            b["real_utterances_per_s"] / med["s"]["real_utterances_per_s"]
        )
    if b.get("real_utterances_per_s") and med.get("f", {}).get("real_utterances_per_s"):
        ratios["f_bfloat16_over_b_real_utt_per_s"] = med["f"]["real_utterances_per_s"] / b["real_utterances_per_s"]
    if a.get("real_utterances_per_s") and med.get("f", {}).get("real_utterances_per_s"):
        ratios["f_bfloat16_over_a_real_utt_per_s"] = med["f"]["real_utterances_per_s"] / a["real_utterances_per_s"]
    for tag in ("c-vmap", "c-int"):
        if med.get(tag, {}).get("seconds_per_epoch") and b.get("seconds_per_epoch"):
            ratios[f"{tag}_time_over_3b"] = med[tag]["seconds_per_epoch"] / (3 * b["seconds_per_epoch"])
    out["ratios"] = ratios
    estimate = {}
    if a.get("seconds_per_epoch"):
        estimate["torch_hours"] = PROTOCOL_EPOCHS * PROTOCOL_SEEDS * a["seconds_per_epoch"] / 3600
    three = {t: med[t]["seconds_per_epoch"] for t in ("c-vmap", "c-int") if med.get(t, {}).get("seconds_per_epoch")}
    if not three and b.get("seconds_per_epoch"):
        three = {"3 x b": 3 * b["seconds_per_epoch"]}
    if three:
        best = min(three, key=three.get)
        compile_s = (med.get("b-cold", {}).get("compile_s") or 0.0) + (
            med.get(best, {}).get("compile_s") or 0.0 if best == "c-vmap" else 0.0
        )
        eval_rate = b.get("eval_utterances_per_s")
        val_s = PROTOCOL_SEEDS * PROTOCOL_VAL_UTTERANCES / eval_rate if eval_rate else 0.0
        test_s = PROTOCOL_SEEDS * PROTOCOL_TEST_UTTERANCES / eval_rate if eval_rate else 0.0
        estimate.update(
            jax_best_mode=best,
            jax_val_s_per_epoch=val_s,
            jax_test_s_once=test_s,
            jax_hours=(PROTOCOL_EPOCHS * (three[best] + val_s) + test_s + compile_s) / 3600,
            jax_hours_test_every_epoch=(PROTOCOL_EPOCHS * (three[best] + val_s + test_s) + compile_s) / 3600,
            basis=f"100 epochs x (3-seed training epoch of the best mode + evaluating "
            f"{PROTOCOL_VAL_UTTERANCES} val utterances per seed at (b)'s evaluation rate) + "
            f"{PROTOCOL_TEST_UTTERANCES} test utterances per seed once + cold compile; "
            f"the PyTorch figure is training only",
        )
    out["protocol_estimate"] = estimate
    targets = {}
    if "b_over_a_real_utt_per_s" in ratios:
        targets["speedup_b_over_a>=1.8"] = ratios["b_over_a_real_utt_per_s"] >= 1.8
    cold = med.get("b-cold", {})
    if cold.get("compile_s") is not None:
        targets["compile_cold<=90s_with<=4_shapes"] = cold["compile_s"] <= 90 and (cold["num_shapes"] or 0) <= 4
        targets["init<=5s"] = cold["init_s"] <= 5
    if b.get("compile_s") is not None:
        targets["compile_warm<=10s"] = b["compile_s"] <= 10
    if b.get("peak_rss_mib") and a.get("peak_rss_mib"):
        targets["peak_rss_b<=a"] = b["peak_rss_mib"] <= a["peak_rss_mib"]
    if estimate.get("jax_hours") is not None:
        targets["protocol<=3h"] = estimate["jax_hours"] <= 3
    if b.get("padding_efficiency") is not None:
        targets["padding_efficiency>=0.9"] = b["padding_efficiency"] >= 0.9
    out["targets_met"] = targets
    return out


def print_lines(result: dict) -> None:
    """One line per figure."""
    print(
        f"machine: {result['machine']['nproc']} cores, {result['machine']['cpu_model']}, "
        f"jax {result['machine']['jax']}, torch {result['machine']['torch']}; dims {result['dims']}"
    )
    names = {
        "a": "(a) PyTorch, pad to batch max",
        "b-cold": "(b) JAX 1 seed, cold cache",
        "b": "(b) JAX 1 seed",
        "s": "(s) JAX 1 seed, shuffled batches",
        "c-vmap": "(c) JAX 3 seeds vmapped",
        "c-int": "(c) JAX 3 seeds stepped in turn",
        "f": "(f) JAX 1 seed, bfloat16 matmuls",
    }
    units = {
        "seconds_per_epoch": "s/epoch",
        "real_utterances_per_s": "real utt/s",
        "compile_s": "s compile",
        "init_s": "s init",
        "num_shapes": "compiled shapes",
        "padding_efficiency": "padding efficiency",
        "padded_utterances": "padded utterances/epoch/seed",
        "peak_rss_mib": "MiB peak RSS",
        "eval_utterances_per_s": "real utt/s evaluating",
        "cores_busy": "cores busy training",
    }
    for tag, figures in result["median"].items():
        for key, unit in units.items():
            value = figures.get(key)
            if value is not None:
                print(
                    f"{names.get(tag, tag)}: {value:.3f} {unit}"
                    if isinstance(value, float)
                    else f"{names.get(tag, tag)}: {value} {unit}"
                )
    for key, value in result["ratios"].items():
        print(f"ratio {key}: {value:.3f}")
    for key, value in result["protocol_estimate"].items():
        print(
            f"protocol estimate {key}: {value:.2f}" if isinstance(value, float) else f"protocol estimate {key}: {value}"
        )
    for key, value in result["targets_met"].items():
        print(f"target {key}: {'met' if value else 'NOT met'}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dims", choices=sorted(DIMS), default="paper", help="paper (default) or tiny (smoke test)")
    parser.add_argument("--epochs", type=int, default=1, help="timed epochs after the warm-up (default 1)")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)} (default all)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="repeat all variants this many times, interleaved; the summary takes medians (default 1)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="PyTorch intra-op threads for (a) (default: PyTorch's own choice, one per core)",
    )
    parser.add_argument(
        "--skip-cold",
        action="store_true",
        help="no separate cold-compile run (b then compiles on the fresh cache itself)",
    )
    parser.add_argument("--out", default=str(RESULTS_DIR / "train_epoch.json"), help="results JSON file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="sequential", help=argparse.SUPPRESS)
    parser.add_argument("--seeds", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--compile-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--batching", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.epochs < 0 or args.rounds < 1:
        parser.error("--epochs must be >= 0 and --rounds >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        args.tag = args.worker
        emit(run_torch(args) if args.worker == "a" else run_jax(args))
        return 0
    result = run_all(args)
    print_lines(result)
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
