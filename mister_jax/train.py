"""Train MiSTER-E on a feature store with the paper's protocol (DESIGN §5, §6).

    python -m mister_jax.train --dataset NAME [--features ROOT] [--out DIR] [--epochs N] [--seeds K]
        [--variant V] [--preset {paper,authors-code}] [--set key=value ...] [--seed-mode {auto,vmap,sequential}] [--no-val {carve,refuse}]
        [--checkpoint-every N] [--checkpoint-minutes M] [--restart]

Without arguments it trains on the built-in demo store (built under ``features/demo`` if absent).
Every epoch evaluates every seed on validation; each seed keeps the parameters of its best validation
weighted F1 (MoE prediction), and those parameters are scored on test once training ends
(``--set test_every_epoch=true`` also evaluates test after every epoch, for learning curves). Writes to ``DIR``:
``results.json`` (DESIGN §6 plus per-expert, per-class, confusion and gate statistics),
``metrics.jsonl`` (one line per epoch), ``report.md`` with PNG figures, ``run_config.json`` and
``checkpoints/`` (`mister_jax.checkpoint`), written once 10 minutes have passed since the last one and after the last
epoch (``--checkpoint-minutes``, ``--checkpoint-every``). Re-running the same command resumes from the
last checkpoint and ends with the same scores as an uninterrupted run.

On a GPU or TPU the matmuls and convolutions run in bfloat16 (``--set dtype=float32`` keeps float32);
the parameters, the optimizer and the losses are float32 everywhere. On glibc the command restarts
itself once with a malloc tunable that gives XLA's large buffers transparent huge pages
(`mister_jax.host_memory`; ``MISTER_HUGEPAGES=default`` opts out).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from mister_jax import atomic
from mister_jax.host_memory import restart_with_huge_pages

DEFAULT_CACHE = Path.home() / ".cache" / "mister" / "jax"
IGNORED_ON_RESUME = ("epochs", "checkpoint_every", "checkpoint_minutes", "on_nonfinite")


class UsageError(Exception):
    """Bad input; the message (one line per problem) says which file or flag and how to fix it."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mister_jax.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="demo", help="preset and store name (default: demo)")
    parser.add_argument("--features", default="features", help="store root; the store is ROOT/NAME")
    parser.add_argument("--out", help="run directory (default: runs/NAME[-VARIANT])")
    parser.add_argument("--epochs", type=int, help="override the preset's epochs")
    parser.add_argument("--seeds", type=int, help="number of seeds 0..K-1 (default 3)")
    parser.add_argument("--variant", help="mister-e, feat-moe, no-loss-moe, monolithic or text-only")
    parser.add_argument("--preset", choices=("paper", "authors-code"), default="paper",
                        help="paper (default): the paper's model and losses; authors-code: what the authors' "
                             "public code trains (3 heads, MLP gate at temperature 2, batch-pooled contrastive "
                             "loss, symmetric KL, no CAN dropout, fully random batches), selected on validation")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override any ModelConfig / LossConfig / TrainConfig field, e.g. lambda_con=0")
    parser.add_argument("--seed-mode", choices=("auto", "vmap", "sequential"), default="auto",
                        help="train seeds in one vmapped step or in separate steps, interleaved (auto: vmap on GPU/TPU)")
    parser.add_argument("--no-val", choices=("carve", "refuse"), default="carve",
                        help="when the store has no val split: carve one from train (fixed seed) or stop")
    parser.add_argument("--checkpoint-every", type=int, help="save the training state every N epochs (default: by time)")
    parser.add_argument("--checkpoint-minutes", type=float,
                        help="save it once M minutes have passed since the last save (default 10; 0: off)")
    parser.add_argument("--on-nonfinite", choices=("stop", "skip-step"),
                        help="a step whose loss or gradient is NaN/inf: stop the run (default, exit 2, the last "
                             "good checkpoint kept) or skip the step and count it")
    parser.add_argument("--restart", action="store_true", help="discard this run's checkpoints and start over")
    parser.add_argument("--jax-cache", default=os.environ.get("MISTER_JAX_CACHE", str(DEFAULT_CACHE)),
                        help="persistent compilation cache (default: $MISTER_JAX_CACHE or ~/.cache/mister/jax)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def enable_compilation_cache(path: str) -> Path | None:
    """Persists compiled XLA programs under ``path`` so a second run does not compile again; returns
    the directory, or None when it cannot be created (then nothing is cached)."""
    import jax

    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return Path(path)


def open_store(dataset: str, features: str):
    """Opens ``features/dataset`` (building the demo store when asked for and absent)."""
    from bridges import FeatureStore, StoreError

    path = Path(features) / dataset
    if os.path.isfile(features):
        raise UsageError(f"--features {features}: is a file, not a folder — pass the store root, the folder that "
                         f"holds {dataset}/")
    try:
        if dataset == "demo" and not (path / "manifest.json").exists():
            from bridges.demo import build_demo_store

            try:
                build_demo_store(features)
            except OSError as err:
                raise UsageError(f"--features {features}: cannot build the demo store there ({err.strerror}) — "
                                 f"pass a writable --features ROOT") from None
        if not path.is_dir():
            raise UsageError(
                f"{path}: no feature store — make one with `python -m encoders_torch.extract --dataset {dataset} "
                f"--out {features} ...`, write it by hand per DESIGN §2, or try --dataset demo")
    except PermissionError:
        pass  # a folder on the way cannot be entered: FeatureStore.open names it
    try:
        store = FeatureStore.open(path)
        problems = store.check_values()
    except StoreError as err:
        raise UsageError("\n".join(err.problems)) from None
    if problems:
        raise UsageError("\n".join(problems))
    return store


def required_modalities(variant: str) -> tuple[str, ...]:
    return ("text",) if variant == "text-only" else ("speech", "text")


def on_accelerator() -> bool:
    """Whether JAX runs on a GPU or TPU, where the matmuls default to bfloat16."""
    import jax

    return jax.default_backend() != "cpu"


def build_preset(args: argparse.Namespace, store):
    """The dataset preset with the store's labels and dims, then --variant, --set and the flags; on a GPU
    or TPU the matmuls and convolutions run in bfloat16 unless ``--set dtype=...`` says otherwise."""
    from mister_jax.config import VARIANTS
    from mister_jax.presets import OverrideError, apply_overrides, get_preset

    preset = get_preset(args.dataset, store.label_names, args.preset)
    dims = {f"{m}_dim": store.modalities[m]["dim"] for m in ("speech", "text") if m in store.modalities}
    overrides = list(args.overrides)
    if args.variant is not None:
        if args.variant not in VARIANTS:
            raise UsageError(f"--variant {args.variant}: unknown variant; choose one of {', '.join(VARIANTS)}")
        overrides.insert(0, f"variant={args.variant}")
    flags = {"epochs": args.epochs, "seeds": args.seeds, "checkpoint_every": args.checkpoint_every,
             "checkpoint_minutes": args.checkpoint_minutes, "on_nonfinite": args.on_nonfinite}
    for name, least in (("epochs", 1), ("seeds", 1), ("checkpoint_every", 0), ("checkpoint_minutes", 0)):
        if flags[name] is not None and flags[name] < least:
            raise UsageError(f"--{name.replace('_', '-')} {flags[name]}: must be >= {least}")
    overrides += [f"train.{k}={v}" for k, v in flags.items() if v is not None]
    if not any(item.split("=", 1)[0].rpartition(".")[2] == "dtype" for item in overrides) and on_accelerator():
        overrides.insert(0, "dtype=bfloat16")
    try:
        preset = apply_overrides(preset, overrides)
        preset = dataclasses.replace(preset, model=dataclasses.replace(
            preset.model, num_classes=len(store.label_names), **dims))
    except OverrideError as err:
        raise UsageError(str(err)) from None
    except ValueError as err:
        raise UsageError(f"--set: {err}") from None
    missing = [m for m in required_modalities(preset.model.variant) if m not in store.modalities]
    if missing:
        raise UsageError(
            f"{store.directory / 'manifest.json'}: variant '{preset.model.variant}' needs modality "
            f"'{missing[0]}', which this store lacks — extract it with `python -m encoders_torch.extract "
            f"--modality {missing[0]}`, or pass --variant text-only")
    return preset


def load_splits(store, preset, no_val: str, log):
    """``(train, val, test, val_source)`` as ``data.SplitData``."""
    from mister_jax.data import carve_validation, load_split

    modalities = required_modalities(preset.model.variant)
    if "train" not in store.splits or "test" not in store.splits:
        raise UsageError(f"{store.directory / 'manifest.json'}: the store needs 'train' and 'test' splits "
                         f"(it has {list(store.splits)}) — extract them")
    if not (store.split("test").labels >= 0).any():
        raise UsageError(f"{store.directory / 'test' / 'index.npz'}: no labelled utterance (every label is -1), but "
                         f"training scores each seed on test — write its labels with bridges.write_index "
                         f"(python -m mister_jax.predict needs none)")
    train = load_split(store, "train", modalities)
    test = load_split(store, "test", modalities)
    if "val" in store.splits:
        return train, load_split(store, "val", modalities), test, "store"
    if no_val == "refuse":
        raise UsageError(f"{store.directory / 'manifest.json'}: the store has no 'val' split — extract one, "
                         f"or pass --no-val carve to carve it from train")
    cfg = preset.train
    train, val = carve_validation(train, cfg.val_fraction, cfg.val_carve_seed)
    for name, part in (("train", train), ("val", val)):
        if not (part.labels >= 0).any():
            raise UsageError(
                f"{store.directory / 'train' / 'index.npz'}: after carving val from train ({val.num_conversations} "
                f"of {train.num_conversations + val.num_conversations} conversations, val_carve_seed "
                f"{cfg.val_carve_seed}), {name} has no labelled utterance — label more training conversations, "
                f"extract a 'val' split, or pass another --set val_carve_seed=N")
    log(f"the store has no 'val' split: carved {val.num_conversations} of {train.num_conversations + val.num_conversations} "
        f"training conversations (fraction {cfg.val_fraction}, seed {cfg.val_carve_seed})")
    return train, val, test, "carved"


def prepare_out(args: argparse.Namespace, variant_given: bool) -> Path:
    suffix = (f"-{args.variant}" if variant_given else "") + ("" if args.preset == "paper" else f"-{args.preset}")
    out = Path(args.out) if args.out else Path("runs") / (args.dataset + suffix)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise UsageError(f"--out {out}: cannot write there ({err.strerror}) — choose a writable directory") from None
    return out


def check_same_run(out: Path, run_config: dict) -> None:
    """Refuses to resume a run directory that was trained with a different configuration."""
    path = out / "run_config.json"
    if not path.exists():
        return
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        raise UsageError(f"{path}: unreadable — delete it, or pass --restart") from None
    strip = lambda c: {**c, "train": {k: v for k, v in c.get("train", {}).items() if k not in IGNORED_ON_RESUME}}
    a, b = strip(old), strip(run_config)
    if a != b:
        diff = sorted({f"{s}.{k}" for s in b if isinstance(b[s], dict) and isinstance(a.get(s), dict)
                       for k in set(a[s]) | set(b[s]) if a[s].get(k) != b[s].get(k)}
                      | {s for s in b if not isinstance(b[s], dict) and a.get(s) != b[s]})
        raise UsageError(f"{out}: holds a run with a different configuration ({', '.join(diff)}) — pass --restart "
                         f"to discard it, or choose another --out")


def aggregate(best: list[dict], label_names: list[str], split: str) -> dict:
    """Scores of the selected epochs over seeds: mean/std/per-seed per expert, per-class and gates."""
    from mister_jax.metrics import EXPERTS, GATE_EXPERTS, mean_std

    records = [b[split] for b in best]
    experts = {e: {"weighted_f1": mean_std([r["weighted_f1"][e] for r in records])}
               for e in EXPERTS if e in records[0]["weighted_f1"]}
    out = {"weighted_f1": experts["moe"]["weighted_f1"], "experts": experts,
           "per_class_f1": {n: float(np.mean([r["per_class_f1"][n] for r in records])) for n in label_names},
           "per_class_f1_per_seed": [r["per_class_f1"] for r in records],
           "per_expert_per_class_f1": {e: {n: float(np.mean([r["per_expert_per_class_f1"][e][n] for r in records]))
                                           for n in label_names} for e in experts},
           "confusion_matrix": np.sum([r["confusion_matrix"] for r in records], axis=0).tolist(),
           "confusion_matrix_per_seed": [r["confusion_matrix"] for r in records]}
    if "gate" in records[0]:
        out["gate"] = {
            "mean": {e: float(np.mean([r["gate"]["mean"][e] for r in records])) for e in GATE_EXPERTS},
            "std": {e: float(np.mean([r["gate"]["std"][e] for r in records])) for e in GATE_EXPERTS},
            "per_class": {n: {e: float(np.mean([r["gate"]["per_class"][n][e] for r in records
                                                if n in r["gate"]["per_class"]])) for e in GATE_EXPERTS}
                          for n in label_names if all(n in r["gate"]["per_class"] for r in records)},
            "per_seed": [r["gate"] for r in records]}
    return out


def checkpoint_due(cfg, epochs_done: int, seconds_since_save: float) -> bool:
    """Whether the state is saved after ``epochs_done`` epochs (`TrainConfig.checkpoint_every`,
    ``checkpoint_minutes``; the last epoch always is)."""
    return (epochs_done == cfg.epochs
            or (cfg.checkpoint_every > 0 and epochs_done % cfg.checkpoint_every == 0)
            or (cfg.checkpoint_minutes > 0 and seconds_since_save >= 60 * cfg.checkpoint_minutes))


class Trainer:
    """One run: all seeds epoch by epoch, evaluation, model selection and checkpoints.

    ``self.work`` holds the training states: one stacked ``TrainState`` (leading seed axis) when
    vmapped, else a list with one per seed. Two host mirrors (`HostMirror`, buffers allocated once)
    hold what a checkpoint writes: ``self.saved`` the training states, ``self.best_params`` each
    seed's best-validation parameters, so a resumed run continues with exactly the same selection.
    """

    def __init__(self, preset, label_names, train, val, test, out: Path, seed_mode: str, log,
                 cache_dir: Path | None = None):
        import jax

        from mister_jax.aot import TrainStepCompiler
        from mister_jax.data import batch_rows, choose_pad_lengths, example_batch, make_batch, padding_efficiency
        from mister_jax.host_mirror import HostMirror
        from mister_jax.trainer import abstract_train_state, make_steps, seed_keys

        self.preset, self.label_names, self.out, self.log = preset, list(label_names), out, log
        self.train, self.val, self.test = train, val, test
        cfg = preset.train
        self.seeds = list(range(cfg.seeds))
        self.vmap = seed_mode == "vmap" or (seed_mode == "auto" and jax.default_backend() != "cpu")
        # Pad lengths of training (at most num_buckets compiled train shapes) and of evaluation (the
        # prediction step compiles on its own), each chosen on its own splits.
        self.pad_lengths = choose_pad_lengths([train.lengths], cfg.batch_size, cfg.num_buckets,
                                              cfg.bucket_multiple, cfg.batching, cfg.pool_batches)
        self.eval_pad_lengths = choose_pad_lengths([val.lengths, test.lengths], cfg.batch_size, cfg.num_buckets,
                                                   cfg.bucket_multiple, "sorted")
        plan = self.epoch_plans(0)[0]
        # Drawn batchings may need any pad length in a later epoch: all of them are compiled.
        shapes = sorted(set(self.pad_lengths) if cfg.batching in ("random", "bucketed") else {p.length for p in plan})
        real, padded = int(train.lengths.sum()), sum(len(p.conversations) * p.length for p in plan)
        self.shape_info = {"batching": cfg.batching, "train_shapes": [[cfg.batch_size, t] for t in shapes],
                           "pad_lengths": list(self.pad_lengths),
                           "padding_efficiency": padding_efficiency(train.lengths, plan),
                           "real_utterances": real, "padded_utterances": padded}
        log(f"{len(shapes)} compiled training shapes [B, T] = {', '.join(f'[{cfg.batch_size}, {t}]' for t in shapes)}; "
            f"{cfg.batching} batches, padding efficiency {self.shape_info['padding_efficiency']:.3f} ({real} real / {padded} padded "
            f"utterances); seeds {self.seeds} {'vmapped in one step' if self.vmap else 'interleaved step by step'}")
        train_fn, self.predict_fn = make_steps(preset.model, preset.loss, cfg, self.vmap)
        keys = [seed_keys(s)[1] for s in self.seeds]
        self.dropout_keys = jax.numpy.stack(keys) if self.vmap else keys
        # Every training shape is compiled before the states exist (lower peak memory), from a disk
        # cache of traced programs when a run with the same code and configuration has compiled them.
        self.train_fn = TrainStepCompiler(train_fn, repr((preset.model, preset.loss, cfg, self.vmap)), cache_dir)
        state = abstract_train_state(preset.model, cfg, len(self.seeds) if self.vmap else None)
        t0 = time.perf_counter()
        for t in shapes:
            example = make_batch(train, batch_rows(train, example_batch(train.lengths, t, cfg.batch_size)))
            if self.vmap:
                example = jax.tree_util.tree_map(lambda x: np.stack([x] * len(self.seeds)), example)
            self.train_fn.compile(state, example, self.dropout_keys if self.vmap else self.dropout_keys[0])
        log(f"compiled {len(shapes)} training shapes in {time.perf_counter() - t0:.1f} s")
        self.eval_batches = {name: self._device_batches(split) for name, split in (("val", val), ("test", test))}
        self.history: list[dict] = []
        self.best: list[dict | None] = [None] * len(self.seeds)
        t0 = time.perf_counter()
        self.work = jax.block_until_ready(self._initial())
        one = abstract_train_state(preset.model, cfg)
        # Host copies: of the training states when a checkpoint is written, of each seed's parameters
        # when its validation score improves (meaningful for seed k once self.best[k] is set).
        self.saved = HostMirror(one, len(self.seeds))
        self.best_params = HostMirror(one.params, len(self.seeds))
        log(f"initialised {len(self.seeds)} seed(s) in {time.perf_counter() - t0:.1f} s")

    def _device_batches(self, split):
        import jax

        from mister_jax.data import epoch_plan, iterate_batches

        cfg = self.preset.train
        plan = epoch_plan(split.lengths, self.eval_pad_lengths, cfg.batch_size, seed=None, epoch=0)
        return [(rows, jax.device_put(batch)) for rows, batch in iterate_batches(split, plan)]

    def _initial(self):
        """Every seed's initial training state on the device (stacked ``[K, ...]`` when vmapped)."""
        import jax
        import jax.numpy as jnp

        from mister_jax.trainer import create_train_state

        states = [create_train_state(self.preset.model, self.preset.train, s) for s in self.seeds]
        return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *states) if self.vmap else states

    def _seed_params(self, k: int):
        """Seed ``k``'s current parameters and whether their leaves are stacked ``[K, ...]``."""
        return (self.work.params, True) if self.vmap else (self.work[k].params, False)

    def _mirrors(self) -> dict:
        """What a checkpoint holds: the host mirrors by name (written and read as whole buffers)."""
        return {"train": self.saved, "best_params": self.best_params}

    def restore(self, ckpt) -> int:
        """Loads the latest checkpoint if there is one; returns the number of epochs already done."""
        import jax
        import jax.numpy as jnp

        if ckpt.latest_epoch() is None:
            return 0
        epoch, meta = ckpt.restore_state(self._mirrors())
        if epoch > self.preset.train.epochs:
            raise UsageError(f"{self.out}: already trained for {epoch} epochs, more than --epochs "
                             f"{self.preset.train.epochs} — pass --restart to train {self.preset.train.epochs} epochs "
                             f"from scratch, or choose another --out (a larger --epochs continues this run)")
        # jnp.array copies: the device state must never alias the host buffers rewritten later.
        self.work = (jax.tree_util.tree_map(jnp.array, self.saved.tree) if self.vmap else
                     [jax.tree_util.tree_map(jnp.array, self.saved.seed(k)) for k in range(len(self.seeds))])
        self.history, self.best = meta["history"], meta["best"]
        self.log(f"resumed {self.out} after epoch {epoch}")
        return epoch

    def predict(self, split_name: str, params) -> list[dict]:
        """Per seed: ``{expert: probs [N, C], "gate": [N, 3]}`` over the rows of split ``split_name``.

        ``params``: the seeds' parameters on the device, stacked ``[K, ...]`` when vmapped, else a list.
        """
        import jax

        split = self.val if split_name == "val" else self.test
        K = len(self.seeds)
        per_seed = [{} for _ in range(K)]
        batches = self.eval_batches[split_name]
        # Every batch of every seed is dispatched before the first result is fetched: one transfer,
        # and no host sync between steps.
        if self.vmap:
            stacked = jax.device_get([self.predict_fn(params, batch) for _, batch in batches])
            fetched = [[{name: v[k] for name, v in out.items()} for k in range(K)] for out in stacked]
        else:
            fetched = jax.device_get([[self.predict_fn(p, batch) for p in params] for _, batch in batches])
        for (rows, _), outs in zip(batches, fetched):
            mask = rows >= 0
            for k, out in enumerate(outs):
                for name, v in out.items():
                    dest = per_seed[k].setdefault(name, np.zeros((split.num_utterances, v.shape[-1]), np.float32))
                    dest[rows[mask]] = v[mask]
        return per_seed

    def evaluate(self, split_name: str, params) -> list[tuple]:
        """Per seed ``(probs {expert: [N, C]}, gate [N, 3] or None, labels [N])`` on the labelled rows of
        split ``split_name`` ("val" or "test"); ``params`` as for `predict`."""
        split = self.val if split_name == "val" else self.test
        labelled = split.labels >= 0
        result = []
        for probs in self.predict(split_name, params):
            gate = probs.pop("gate", None)
            result.append(({e: p[labelled] for e, p in probs.items()}, None if gate is None else gate[labelled],
                           split.labels[labelled]))
        return result

    def current_params(self):
        """The seeds' current parameters on the device, as `predict` takes them."""
        return self.work.params if self.vmap else [w.params for w in self.work]

    def test_best(self) -> None:
        """Scores each seed's best-validation parameters on the test split (``self.best[k]["test"]``)."""
        import jax

        from mister_jax.metrics import summarize

        params = jax.device_put(self.best_params.tree if self.vmap else
                                [self.best_params.seed(k) for k in range(len(self.seeds))])
        for k, (probs, gate, labels) in enumerate(self.evaluate("test", params)):
            self.best[k]["test"] = summarize(labels, probs, gate, self.label_names, detailed=True)

    def epoch_plans(self, epoch: int) -> list:
        """The training batches of ``epoch`` per seed; step ``i`` has one shape for all seeds when vmapped."""
        from mister_jax.data import align_steps, epoch_plan

        cfg = self.preset.train
        plans = [epoch_plan(self.train.lengths, self.pad_lengths, cfg.batch_size, seed=s, epoch=epoch,
                            batching=cfg.batching, pool_batches=cfg.pool_batches) for s in self.seeds]
        return align_steps(plans) if self.vmap else plans

    def train_epoch(self, epoch: int) -> tuple[list[list[dict]], float]:
        """One pass over train for every seed; returns per-seed step metrics and the seconds taken."""
        import jax

        from mister_jax.data import batch_rows, make_batch

        K = len(self.seeds)
        plans = self.epoch_plans(epoch)
        t0 = time.perf_counter()
        # Each pass's batches are gathered and put on the device before its first step, so the host
        # does not compete with the steps for the cores and nothing waits on the host between steps.
        if self.vmap:
            per_seed = [[make_batch(self.train, batch_rows(self.train, p)) for p in plan] for plan in plans]
            batches = jax.device_put([jax.tree_util.tree_map(lambda *xs: np.stack(xs), *step)
                                      for step in zip(*per_seed)])
            stacked = []  # per step, metrics with a leading seed axis [K]
            for batch in batches:
                self.work, m = self.train_fn(self.work, batch, self.dropout_keys)
                stacked.append(m)
            stacked = jax.device_get(stacked)  # one transfer per pass, split per seed on the host
            metrics = [[jax.tree_util.tree_map(lambda x: x[k], m) for m in stacked] for k in range(K)]
        else:
            # Interleaved: step i of every seed before step i + 1 (every seed has as many steps, each its
            # own shapes). Each seed still sees exactly its own sequence; on a 2-core CPU a pass is
            # faster than seed after seed (benchmarks/train_epoch.py, c-int; docs/BENCHMARKS.md).
            batches = jax.device_put([[make_batch(self.train, batch_rows(self.train, p)) for p in plan]
                                      for plan in plans])
            metrics = [[] for _ in self.seeds]
            for i in range(len(plans[0])):
                for k in range(K):
                    self.work[k], m = self.train_fn(self.work[k], batches[k][i], self.dropout_keys[k])
                    metrics[k].append(m)
            metrics = jax.device_get(metrics)
        return metrics, time.perf_counter() - t0

    def fit(self, ckpt, start_epoch: int, progress: bool) -> None:
        """Trains from ``start_epoch`` to the configured number of epochs."""
        from tqdm import tqdm

        from mister_jax.metrics import summarize

        cfg = self.preset.train
        metrics_path = self.out / "metrics.jsonl"
        with open(metrics_path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(h) + "\n" for h in self.history)
        bar = tqdm(total=cfg.epochs, initial=start_epoch, desc=self.preset.model.variant, unit="epoch",
                   disable=not progress, file=sys.stderr, dynamic_ncols=True)
        last_save = time.monotonic()
        for epoch in range(start_epoch, cfg.epochs):
            step_metrics, seconds = self.train_epoch(epoch)
            skipped = self.check_finite(epoch, step_metrics, ckpt)
            utterances = sum(int(m["utterances"]) for per_seed in step_metrics for m in per_seed)
            record = {"epoch": epoch + 1,
                      "train_loss": [float(np.mean([m["loss"] for m in sm])) for sm in step_metrics],
                      "train_terms": [{t: float(np.mean([m[t] for m in sm])) for t in sm[0]
                                       if t not in ("loss", "utterances", "nonfinite")} for sm in step_metrics],
                      "seconds": seconds, "utterances_per_second": utterances / seconds}
            if cfg.on_nonfinite == "skip-step":
                record["skipped_nonfinite_steps"] = skipped
            t0 = time.perf_counter()
            ckpt.wait()  # the host mirrors are rewritten below
            waited, t0 = time.perf_counter() - t0, time.perf_counter()
            params = self.current_params()
            val = [summarize(labels, probs, gate, self.label_names, detailed=True)
                   for probs, gate, labels in self.evaluate("val", params)]
            record["val"] = {e: [v["weighted_f1"][e] for v in val] for e in val[0]["weighted_f1"]}
            if cfg.test_every_epoch:
                test = [summarize(labels, probs, gate, self.label_names, detailed=False)["weighted_f1"]
                        for probs, gate, labels in self.evaluate("test", params)]
                record["test"] = {e: [t[e] for t in test] for e in test[0]}
            for k in range(len(self.seeds)):
                if self.best[k] is None or val[k]["weighted_f1"]["moe"] > self.best[k]["val"]["weighted_f1"]["moe"]:
                    self.best[k] = {"epoch": epoch + 1, "val": val[k]}
                    self.best_params.put(k, *self._seed_params(k))
            # Wall time beyond the training pass: validation and model selection; the checkpoint's
            # share is waiting for the previous write and the host copies of this one.
            record["validation_seconds"], t0 = time.perf_counter() - t0, time.perf_counter()
            record["checkpoint_seconds"] = waited
            self.history.append(record)
            if checkpoint_due(cfg, epoch + 1, time.monotonic() - last_save):
                if self.vmap:
                    self.saved.put_stacked(self.work)
                else:
                    for k, state in enumerate(self.work):
                        self.saved.put(k, state)
                record["checkpoint_seconds"] += time.perf_counter() - t0
                ckpt.save_state(epoch + 1, self._mirrors(),
                                json.loads(json.dumps({"history": self.history, "best": self.best})))
                last_save = time.monotonic()
            with open(metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(record['train_loss']):.3f}",
                            val_f1=f"{np.mean(record['val']['moe']):.3f}",
                            utt_s=f"{record['utterances_per_second']:.0f}")
        bar.close()

    def check_finite(self, epoch: int, step_metrics: list[list[dict]], ckpt) -> list[int]:
        """The number of non-finite steps of each seed in this epoch; with ``on_nonfinite="stop"`` the
        first one stops the run (`UsageError`) before anything of this epoch is saved."""
        skipped = [int(sum(bool(m["nonfinite"]) for m in sm)) for sm in step_metrics]
        if self.preset.train.on_nonfinite == "skip-step" or not any(skipped):
            return skipped
        k = next(k for k, n in enumerate(skipped) if n)
        step = next(i for i, m in enumerate(step_metrics[k]) if m["nonfinite"])
        m = step_metrics[k][step]
        term = next((f"loss term {t} = {float(m[t])}" for t in _LOSS_TERMS if t in m and not np.isfinite(m[t])),
                    f"gradient norm = {float(m['grad_norm'])}")
        ckpt.wait()
        last = ckpt.latest_epoch()
        kept = f"the checkpoint of epoch {last} is kept" if last else "no checkpoint was written yet"
        raise UsageError(
            f"epoch {epoch + 1}, step {step + 1} of {len(step_metrics[k])}, seed {self.seeds[k]}: {term} — training "
            f"stopped, {kept} and no results.json was written; check the features for NaN/inf "
            f"(python -m bridges.check), lower the learning rate (--set learning_rate=...), or pass "
            f"--on-nonfinite skip-step to skip such steps")

    def export_best(self, ckpt) -> None:
        """Writes each seed's best parameters to ``checkpoints/best/seed_<s>`` (read by predict)."""
        for k, seed in enumerate(self.seeds):
            ckpt.save_best(seed, self.best[k]["epoch"], self.best_params.seed(k))


_LOSS_TERMS = ("focal_speech", "focal_text", "focal_multimodal", "contrastive", "kl", "focal_moe")


def results_json(dataset: str, preset, label_names, history, best, shape_info, val_source, num_params) -> dict:
    cfg = preset.train
    skipped = {}
    if cfg.on_nonfinite == "skip-step":
        skipped["skipped_nonfinite_steps"] = [int(sum(h.get("skipped_nonfinite_steps", [0] * cfg.seeds)[k]
                                                      for h in history)) for k in range(cfg.seeds)]
    return {**skipped, "dataset": dataset, "variant": preset.model.variant, "seeds": list(range(cfg.seeds)),
            "epochs": cfg.epochs, "label_names": list(label_names),
            "test": aggregate(best, label_names, "test"), "val": aggregate(best, label_names, "val"),
            "best_epoch": [b["epoch"] for b in best], "epoch_numbering": "1 = after the first pass over train",
            "val_source": val_source, "num_params": num_params,
            "train_seconds": float(sum(h["seconds"] for h in history)), **shape_info,
            "config": {"model": dataclasses.asdict(preset.model), "loss": dataclasses.asdict(preset.loss),
                       "train": dataclasses.asdict(preset.train)}}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    try:
        return _main(args, log)
    except UsageError as err:
        for line in str(err).splitlines():
            log(f"error: {line}")
        return 2
    except KeyboardInterrupt:
        log("interrupted — rerun the same command to resume from the last checkpoint")
        return 130


def _main(args: argparse.Namespace, log) -> int:
    store = open_store(args.dataset, args.features)
    preset = build_preset(args, store)
    train, val, test, val_source = load_splits(store, preset, args.no_val, log)
    out = prepare_out(args, args.variant is not None)

    cache_dir = enable_compilation_cache(args.jax_cache)
    import shutil

    from mister_jax.checkpoint import CheckpointError, RunCheckpoints
    from mister_jax.model import count_params
    from mister_jax.report import ReportError, write_report

    run_config = {"dataset": args.dataset, "store": str(store.directory.resolve()),
                  "label_names": store.label_names, "val_source": val_source,
                  "model": dataclasses.asdict(preset.model), "loss": dataclasses.asdict(preset.loss),
                  "train": dataclasses.asdict(preset.train)}
    if args.restart:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        (out / "run_config.json").unlink(missing_ok=True)
    else:
        check_same_run(out, run_config)

    trainer = Trainer(preset, store.label_names, train, val, test, out, args.seed_mode, log, cache_dir)
    try:
        ckpt = RunCheckpoints(out / "checkpoints")
        try:
            start = trainer.restore(ckpt)
            atomic.write_json(out / "run_config.json", run_config)  # a refused resume leaves it as it was
            trainer.fit(ckpt, start, progress=not args.quiet)
            trainer.export_best(ckpt)
            trainer.test_best()
        finally:
            ckpt.close()
    except CheckpointError as err:
        raise UsageError(str(err)) from None
    num_params = count_params(trainer.best_params.seed(0))
    results = results_json(args.dataset, preset, store.label_names, trainer.history, trainer.best, trainer.shape_info,
                           val_source, num_params)
    atomic.write_json(out / "results.json", results)
    try:
        write_report(out, results, trainer.history)
    except ReportError as err:
        raise UsageError(f"{err}; results.json and metrics.jsonl are complete — free the space and rerun the same "
                         f"command to write the report") from None
    t = results["test"]
    experts = ", ".join(f"{e} {100 * v['weighted_f1']['mean']:.1f}" for e, v in t["experts"].items())
    log(f"test weighted F1 {100 * t['weighted_f1']['mean']:.1f} ± {100 * t['weighted_f1']['std']:.1f} "
        f"({experts}); "
        f"wrote {out / 'results.json'} and {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    restart_with_huge_pages()
    sys.exit(main())
