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
  b     our jitted JAX step (`mister_jax.trainer.make_steps`), 1 seed, with the trainer's default
        batching (bucketed: random per seed and epoch, pools sorted by length;
        `mister_jax.data.choose_pad_lengths` + `epoch_plan`, vmapped seeds aligned per step); run twice on one
        fresh persistent compilation cache: `b-cold` (init + compile only) then `b` (warm compile + epochs);
  c     3 seeds: `c-vmap` (one vmapped step), `c-seq` (one seed after the other, same step as b) and
        `c-int` (the same steps interleaved: step i of every seed before step i + 1, as the trainer does);
  s     b with `batching="shuffled"` (random batch composition within length buckets): the
        padding lever measured end to end;
  m     b under glibc's default malloc settings (4 KiB pages): the huge-page lever measured end to end;
  h     a under the same huge-page tunable as ours: whether PyTorch would gain as much from it;
  f     b with bfloat16 matmuls and convolutions (`--set dtype=bfloat16`; parameters, optimizer and
        losses stay float32): what a CPU with AVX-512 BF16 gains from them.

The JAX workers run with `mister_jax.host_memory.MALLOC_TUNABLES` in their environment, as
`python -m mister_jax.train` does (except m); PyTorch (a) runs with glibc's defaults, as the authors
run it.

Warm-up before the timed epochs: two batches (PyTorch) or one step per compiled shape (JAX).
Every epoch's batches are gathered on the host and put on the device before its first step (the
gather is inside the timing); no host synchronisation happens between steps of an epoch.
Prints one line per figure and writes benchmarks/results/train_epoch.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
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

from common import DIMS, RESULTS_DIR, authors_batches, emit, machine_info, make_corpus, pad_batch  # noqa: E402
from common import padded_utterances, parse_result, peak_rss_mib, write_result  # noqa: E402

VARIANTS = ("a", "b", "c", "s", "m", "h", "f")
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
    return {"variant": args.tag, "framework": "torch", "threads": torch.get_num_threads(), "seeds": 1,
            "attention_heads": heads,
            "init_s": init_s, "compile_s": 0.0, "num_shapes": None, "epoch_s": epoch_s,
            "epoch_cpu_s": epoch_cpu_s, "real_utterances": real, "padded_utterances": float(np.mean(padded)),
            "padding_efficiency": real / float(np.mean(padded)),
            "params": sum(p.numel() for p in model.parameters()),
            "final_loss": losses[-1] if losses else None, "peak_rss_mib": peak_rss_mib()}


# ----------------------------------------------------------------------------------------------------
# (b), (c) our JAX step


def split_data(corpus):
    """The synthetic corpus as a `mister_jax.data.SplitData` (what the trainer loads from a store)."""
    from mister_jax.data import SplitData

    n = len(corpus.labels)
    conv = np.repeat(np.arange(len(corpus.lengths)), corpus.lengths)
    return SplitData(name="train", features={"speech": corpus.speech, "text": corpus.text},
                     labels=corpus.labels, utterance_ids=np.array([f"u{i}" for i in range(n)]),
                     conversation_ids=np.array([f"c{i}" for i in conv]), starts=corpus.starts,
                     lengths=corpus.lengths)


def presets(dims):
    """(ModelConfig, LossConfig, TrainConfig) of the IEMOCAP preset at the benchmark's dims."""
    from mister_jax.config import LossConfig, ModelConfig
    from mister_jax.presets import TrainConfig

    model = ModelConfig(speech_dim=dims.speech_dim, text_dim=dims.text_dim, num_classes=dims.num_classes,
                        can_hidden=dims.can_hidden, gru_layers=dims.gru_layers, fusion_dim=dims.fusion_dim,
                        fusion_layers=dims.fusion_layers, attention_dim=dims.attention_dim,
                        attention_heads=dims.attention_heads)
    return model, LossConfig(lambda_con=2.0, alpha_kl=0.1, temperature=1.0), TrainConfig(batch_size=dims.batch_size)


def run_jax(args) -> dict:
    """Our step: init, AOT compile of every training shape, one warm-up step per shape, timed epochs."""
    import jax

    if args.cache_dir:
        jax.config.update("jax_compilation_cache_dir", args.cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    from mister_jax.aot import TrainStepCompiler
    from mister_jax.data import (align_steps, batch_rows, choose_pad_lengths, epoch_plan, example_batch, make_batch,
                                 padding_efficiency)
    from mister_jax.model import count_params
    from mister_jax.trainer import abstract_train_state, create_train_state, make_steps, seed_keys, stack_states

    dims = DIMS[args.dims]
    model_cfg, loss_cfg, train_cfg = presets(dims)
    model_cfg = dataclasses.replace(model_cfg, dtype=args.dtype)
    if args.batching:
        train_cfg = dataclasses.replace(train_cfg, batching=args.batching)
    data = split_data(make_corpus(dims))
    mode = args.mode
    seeds = list(range(args.seeds))
    vmap = mode == "vmap"

    train_fn, predict_fn = make_steps(model_cfg, loss_cfg, train_cfg, vmap)
    keys = [seed_keys(s)[1] for s in seeds]
    keys = jax.numpy.stack(keys) if vmap else keys
    key0 = keys if vmap else keys[0]
    pad_lengths = choose_pad_lengths([data.lengths], train_cfg.batch_size, train_cfg.num_buckets,
                                     train_cfg.bucket_multiple, train_cfg.batching, train_cfg.pool_batches)

    def plans(epoch):
        per_seed = [epoch_plan(data.lengths, pad_lengths, train_cfg.batch_size, seed=s, epoch=epoch,
                               batching=train_cfg.batching, pool_batches=train_cfg.pool_batches) for s in seeds]
        return align_steps(per_seed) if vmap else per_seed

    def device_batches(epoch):
        """All batches of an epoch on the device: per seed a list, or (vmap) one list of stacked batches."""
        per_seed = [[make_batch(data, batch_rows(data, p)) for p in plan] for plan in plans(epoch)]
        if vmap:
            stacked = [jax.tree_util.tree_map(lambda *xs: np.stack(xs), *bs) for bs in zip(*per_seed)]
            return jax.device_put(stacked)
        return jax.device_put(per_seed)

    first = plans(0)[0]
    shapes = sorted({p.length for p in first} | set(pad_lengths))  # as the trainer: every pad length
    example = {t: make_batch(data, batch_rows(data, example_batch(data.lengths, t, train_cfg.batch_size)))
               for t in shapes}
    if vmap:
        example = {t: jax.tree_util.tree_map(lambda x: np.stack([x] * len(seeds)), b) for t, b in example.items()}
    # As the trainer does: every shape compiled from the state's shapes, before the state exists.
    step_fn = TrainStepCompiler(train_fn, repr((model_cfg, loss_cfg, train_cfg, vmap)), args.cache_dir)
    abstract = abstract_train_state(model_cfg, train_cfg, len(seeds) if vmap else None)
    t0 = time.perf_counter()
    for t in shapes:
        step_fn.compile(abstract, example[t], key0)
    compile_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    states = [create_train_state(model_cfg, train_cfg, s) for s in seeds]
    states = jax.block_until_ready(stack_states(states) if vmap else states)
    if vmap:
        states = jax.device_put(states)
    init_s = time.perf_counter() - t0

    record = {"variant": args.tag, "framework": "jax", "mode": mode, "batching": train_cfg.batching,
              "seeds": len(seeds), "init_s": init_s, "compile_s": compile_s, "num_shapes": step_fn.num_shapes,
              "shapes": [[train_cfg.batch_size, t] for t in shapes], "pad_lengths": list(pad_lengths),
              "params": count_params(states.params if vmap else states[0].params)}
    if args.compile_only:
        record.update(epoch_s=[], peak_rss_mib=peak_rss_mib())
        return record

    def step(k, state, batch):
        return step_fn(state, batch, keys if vmap else keys[k])

    # Warm-up: one step per compiled shape (first use of each executable).
    warm = device_batches(0)
    seen = set()
    if vmap:
        for batch in warm:
            if batch.mask.shape[-1] not in seen:
                seen.add(batch.mask.shape[-1])
                states, _ = step(None, states, batch)
    else:
        for batch in warm[0]:
            if batch.mask.shape[-1] not in seen:
                seen.add(batch.mask.shape[-1])
                states[0], _ = step(0, states[0], batch)
    jax.block_until_ready(states)
    del warm

    epoch_s, epoch_cpu_s, losses = [], [], []
    for epoch in range(1, args.epochs + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        batches = device_batches(epoch)
        metrics = []
        if vmap:
            for batch in batches:
                states, m = step(None, states, batch)
                metrics.append(m["loss"])
        else:
            # "interleaved": batch i of every seed before batch i + 1 (the shape sequence is the same for all).
            order = ([(k, i) for i in range(len(batches[0])) for k in range(len(seeds))] if mode == "interleaved"
                     else [(k, i) for k in range(len(seeds)) for i in range(len(batches[k]))])
            for k, i in order:
                states[k], m = step(k, states[k], batches[k][i])
                metrics.append(m["loss"])
        losses = np.asarray(jax.device_get(metrics))
        epoch_s.append(time.perf_counter() - t0)
        epoch_cpu_s.append(time.process_time() - c0)
        del batches
    real = int(data.lengths.sum())
    padded = sum(len(p.conversations) * p.length for p in first)
    if mode == "single" and args.epochs:  # the evaluation rate (b, s): what the protocol estimate needs
        record.update(eval_utterances_per_s=time_evaluation(predict_fn, states[0].params, data, pad_lengths, train_cfg))
    record.update(epoch_s=epoch_s, epoch_cpu_s=epoch_cpu_s, real_utterances=real, padded_utterances=padded,
                  padding_efficiency=padding_efficiency(data.lengths, first),
                  final_loss=float(np.mean(losses[-1])) if len(losses) else None,
                  loss_finite=bool(np.all(np.isfinite(losses))), peak_rss_mib=peak_rss_mib())
    return record


def time_evaluation(predict_fn, params, data, pad_lengths, train_cfg) -> float:
    """Real utterances/s of one evaluation pass (the trainer's: sorted batches, store order), compiled first."""
    import jax

    from mister_jax.data import epoch_plan, iterate_batches

    plan = epoch_plan(data.lengths, pad_lengths, train_cfg.batch_size, seed=None, epoch=0, batching=train_cfg.batching)
    batches = [jax.device_put(batch) for _, batch in iterate_batches(data, plan)]
    for t in sorted({b.mask.shape[-1] for b in batches}):
        jax.block_until_ready(predict_fn(params, next(b for b in batches if b.mask.shape[-1] == t)))
    t0 = time.perf_counter()
    jax.block_until_ready([predict_fn(params, b) for b in batches])
    return float(data.lengths.sum()) / (time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------------------
# orchestration


def worker_command(args, tag: str, **extra) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", tag, "--dims", args.dims,
           "--epochs", str(args.epochs)]
    for name, value in extra.items():
        flag = "--" + name.replace("_", "-")
        cmd += [flag] if value is True else [flag, str(value)]
    return cmd


def run_worker(cmd: list[str], timeout: float, huge_pages: bool) -> dict:
    """Runs one variant in a fresh interpreter and returns its RESULT record (wall time added);
    ``huge_pages``: under the training CLI's malloc tunables, else glibc's defaults."""
    from mister_jax.host_memory import OPT_OUT, with_malloc_tunables

    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", OPT_OUT)}
    if huge_pages:
        env = with_malloc_tunables(env)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=HERE.parent, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark worker {' '.join(cmd[2:])} failed (exit {proc.returncode}):\n"
                           + proc.stderr[-3000:])
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
        raise SystemExit(f"benchmarks/train_epoch.py: --variants {','.join(unknown)} unknown; "
                         f"use a subset of {','.join(VARIANTS)}.")
    timeout = 3600.0
    rounds = []
    for _ in range(args.rounds):
        runs = {}
        cache = tempfile.mkdtemp(prefix="mister-jax-cache-")
        try:
            if "a" in wanted:
                runs["a"] = run_worker(worker_command(args, "a", threads=args.threads), timeout, huge_pages=False)
            if "h" in wanted:
                runs["h"] = run_worker(worker_command(args, "h", threads=args.threads), timeout, huge_pages=True)
            if ("b" in wanted or "c" in wanted) and not args.skip_cold:
                runs["b-cold"] = run_worker(worker_command(args, "b-cold", mode="single", seeds=1,
                                                           cache_dir=cache, compile_only=True), timeout, huge_pages=True)
            if "b" in wanted:
                runs["b"] = run_worker(worker_command(args, "b", mode="single", seeds=1, cache_dir=cache), timeout,
                                       huge_pages=True)
            if "c" in wanted:
                runs["c-vmap"] = run_worker(worker_command(args, "c-vmap", mode="vmap", seeds=3, cache_dir=cache),
                                            timeout, huge_pages=True)
                runs["c-seq"] = run_worker(worker_command(args, "c-seq", mode="sequential", seeds=3,
                                                          cache_dir=cache), timeout, huge_pages=True)
                runs["c-int"] = run_worker(worker_command(args, "c-int", mode="interleaved", seeds=3,
                                                          cache_dir=cache), timeout, huge_pages=True)
            if "s" in wanted:
                runs["s"] = run_worker(worker_command(args, "s", mode="single", seeds=1, cache_dir=cache,
                                                      batching="shuffled"), timeout, huge_pages=True)
            if "m" in wanted:
                runs["m"] = run_worker(worker_command(args, "m", mode="single", seeds=1, cache_dir=cache),
                                       timeout, huge_pages=False)
            if "f" in wanted:
                runs["f"] = run_worker(worker_command(args, "f", mode="single", seeds=1, cache_dir=cache,
                                                      dtype="bfloat16"), timeout, huge_pages=True)
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
    med = {t: {k: _median(rounds, t, k) for k in ("seconds_per_epoch", "real_utterances_per_s", "compile_s",
                                                   "init_s", "peak_rss_mib", "padding_efficiency", "cores_busy", "num_shapes", "eval_utterances_per_s",
                                                   "padded_utterances")} for t in tags}
    out = {"dims": args.dims, "epochs_timed": args.epochs, "rounds": rounds, "median": med,
           "machine": machine_info(), "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    a, b = med.get("a", {}), med.get("b", {})
    ratios = {}
    if a.get("real_utterances_per_s") and b.get("real_utterances_per_s"):
        ratios["b_over_a_real_utt_per_s"] = b["real_utterances_per_s"] / a["real_utterances_per_s"]
    if b.get("real_utterances_per_s") and med.get("s", {}).get("real_utterances_per_s"):
        ratios["b_sorted_over_s_shuffled_real_utt_per_s"] = b["real_utterances_per_s"] / med["s"]["real_utterances_per_s"]
    if b.get("real_utterances_per_s") and med.get("m", {}).get("real_utterances_per_s"):
        ratios["b_huge_pages_over_m_default_malloc_real_utt_per_s"] = (b["real_utterances_per_s"]
                                                                       / med["m"]["real_utterances_per_s"])
    if b.get("real_utterances_per_s") and med.get("f", {}).get("real_utterances_per_s"):
        ratios["f_bfloat16_over_b_real_utt_per_s"] = med["f"]["real_utterances_per_s"] / b["real_utterances_per_s"]
    if a.get("real_utterances_per_s") and med.get("f", {}).get("real_utterances_per_s"):
        ratios["f_bfloat16_over_a_real_utt_per_s"] = med["f"]["real_utterances_per_s"] / a["real_utterances_per_s"]
    if med.get("a", {}).get("real_utterances_per_s") and med.get("h", {}).get("real_utterances_per_s"):
        ratios["h_huge_pages_over_a_default_malloc_real_utt_per_s"] = (med["h"]["real_utterances_per_s"]
                                                                       / med["a"]["real_utterances_per_s"])
    for tag in ("c-vmap", "c-seq", "c-int"):
        if med.get(tag, {}).get("seconds_per_epoch") and b.get("seconds_per_epoch"):
            ratios[f"{tag}_time_over_3b"] = med[tag]["seconds_per_epoch"] / (3 * b["seconds_per_epoch"])
    out["ratios"] = ratios
    estimate = {}
    if a.get("seconds_per_epoch"):
        estimate["torch_hours"] = PROTOCOL_EPOCHS * PROTOCOL_SEEDS * a["seconds_per_epoch"] / 3600
    three = {t: med[t]["seconds_per_epoch"] for t in ("c-vmap", "c-seq", "c-int") if med.get(t, {}).get("seconds_per_epoch")}
    if not three and b.get("seconds_per_epoch"):
        three = {"3 x b": 3 * b["seconds_per_epoch"]}
    if three:
        best = min(three, key=three.get)
        compile_s = (med.get("b-cold", {}).get("compile_s") or 0.0) + (
            med.get(best, {}).get("compile_s") or 0.0 if best == "c-vmap" else 0.0)
        eval_rate = b.get("eval_utterances_per_s")
        val_s = PROTOCOL_SEEDS * PROTOCOL_VAL_UTTERANCES / eval_rate if eval_rate else 0.0
        test_s = PROTOCOL_SEEDS * PROTOCOL_TEST_UTTERANCES / eval_rate if eval_rate else 0.0
        estimate.update(jax_best_mode=best, jax_val_s_per_epoch=val_s, jax_test_s_once=test_s,
                        jax_hours=(PROTOCOL_EPOCHS * (three[best] + val_s) + test_s + compile_s) / 3600,
                        jax_hours_test_every_epoch=(PROTOCOL_EPOCHS * (three[best] + val_s + test_s) + compile_s) / 3600,
                        basis=f"100 epochs x (3-seed training epoch of the best mode + evaluating "
                              f"{PROTOCOL_VAL_UTTERANCES} val utterances per seed at (b)'s evaluation rate) + "
                              f"{PROTOCOL_TEST_UTTERANCES} test utterances per seed once + cold compile; "
                              f"the PyTorch figure is training only")
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
    print(f"machine: {result['machine']['nproc']} cores, {result['machine']['cpu_model']}, "
          f"jax {result['machine']['jax']}, torch {result['machine']['torch']}; dims {result['dims']}")
    names = {"a": "(a) PyTorch, pad to batch max", "b-cold": "(b) JAX 1 seed, cold cache",
             "b": "(b) JAX 1 seed", "s": "(s) JAX 1 seed, shuffled batches",
             "m": "(m) JAX 1 seed, glibc's default malloc", "h": "(h) PyTorch under our huge-page tunable", "c-vmap": "(c) JAX 3 seeds vmapped", "c-seq": "(c) JAX 3 seeds sequential",
             "c-int": "(c) JAX 3 seeds interleaved", "f": "(f) JAX 1 seed, bfloat16 matmuls"}
    units = {"seconds_per_epoch": "s/epoch", "real_utterances_per_s": "real utt/s", "compile_s": "s compile",
             "init_s": "s init", "num_shapes": "compiled shapes", "padding_efficiency": "padding efficiency",
             "padded_utterances": "padded utterances/epoch/seed", "peak_rss_mib": "MiB peak RSS",
             "eval_utterances_per_s": "real utt/s evaluating", "cores_busy": "cores busy training"}
    for tag, figures in result["median"].items():
        for key, unit in units.items():
            value = figures.get(key)
            if value is not None:
                print(f"{names.get(tag, tag)}: {value:.3f} {unit}" if isinstance(value, float)
                      else f"{names.get(tag, tag)}: {value} {unit}")
    for key, value in result["ratios"].items():
        print(f"ratio {key}: {value:.3f}")
    for key, value in result["protocol_estimate"].items():
        print(f"protocol estimate {key}: {value:.2f}" if isinstance(value, float) else f"protocol estimate {key}: {value}")
    for key, value in result["targets_met"].items():
        print(f"target {key}: {'met' if value else 'NOT met'}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dims", choices=sorted(DIMS), default="paper", help="paper (default) or tiny (smoke test)")
    parser.add_argument("--epochs", type=int, default=1, help="timed epochs after the warm-up (default 1)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated subset of {','.join(VARIANTS)} (default all)")
    parser.add_argument("--rounds", type=int, default=1, help="repeat all variants this many times, interleaved; "
                        "the summary takes medians (default 1)")
    parser.add_argument("--threads", type=int, default=0,
                        help="PyTorch intra-op threads for (a) (default: PyTorch's own choice, one per core)")
    parser.add_argument("--skip-cold", action="store_true",
                        help="no separate cold-compile run (b then compiles on the fresh cache itself)")
    parser.add_argument("--out", default=str(RESULTS_DIR / "train_epoch.json"), help="results JSON file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="single", help=argparse.SUPPRESS)
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
        emit(run_torch(args) if args.worker in ("a", "h") else run_jax(args))
        return 0
    result = run_all(args)
    print_lines(result)
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
