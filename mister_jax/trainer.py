"""The training loop of one run: every seed epoch by epoch, validation and model selection after each
epoch, checkpoints, and the best parameters scored on test at the end (DESIGN §5). `train_and_evaluate`
(`mister_jax.train`) builds and drives it."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mister_jax.batching import BatchPlanner, padding_efficiency
from mister_jax.checkpoint import RunCheckpoints
from mister_jax.compare import PREDICTIONS, write_test_predictions
from mister_jax.config import Config
from mister_jax.errors import UsageError
from mister_jax.evaluate import Evaluator, improved
from mister_jax.input_pipeline import batch_rows, make_batch
from mister_jax.runtime.host_mirror import HostMirror
from mister_jax.seeds import SeedStates, resolve_seed_mode
from mister_jax.sharding import SeedMesh
from mister_jax.steps import abstract_train_state

LOSS_TERMS = ("focal_speech", "focal_text", "focal_multimodal", "contrastive", "kl", "focal_moe")


def checkpoint_due(cfg, epochs_done: int, seconds_since_save: float) -> bool:
    """Whether the state is saved after ``epochs_done`` epochs (`TrainConfig.checkpoint_every`,
    ``checkpoint_minutes``; the last epoch always is)."""
    return (
        epochs_done == cfg.epochs
        or (cfg.checkpoint_every > 0 and epochs_done % cfg.checkpoint_every == 0)
        or (cfg.checkpoint_minutes > 0 and seconds_since_save >= 60 * cfg.checkpoint_minutes)
    )


def train_epoch(seeds: SeedStates, planner: BatchPlanner, train, epoch: int) -> tuple[list[list[dict]], float]:
    """One pass over the split ``train`` for every seed of ``seeds``, with the batches ``planner`` draws
    for ``epoch``; returns the per-seed step metrics and the seconds taken (gathering the batches
    included)."""
    plans = planner.train_epoch(train.lengths, seeds.seeds, epoch, seeds.aligned)
    t0 = time.perf_counter()
    steps = [[make_batch(train, batch_rows(train, p)) for p in step] for step in zip(*plans)]
    return seeds.train_epoch(steps), time.perf_counter() - t0


class Trainer:
    """One run: all seeds epoch by epoch, evaluation, model selection and checkpoints.

    Two host mirrors (`HostMirror`, buffers allocated once) hold what a checkpoint writes:
    ``self.saved`` the training states, ``self.best_params`` each seed's best-validation parameters, so
    a resumed run continues with exactly the same selection.

    ``devices`` devices per process (None: all of them, `mister_jax.sharding.SeedMesh`) train the seeds;
    of several processes only the primary one (``self.primary``) writes files.
    """

    def __init__(
        self,
        config: Config,
        label_names,
        train,
        val,
        test,
        workdir: Path,
        seed_mode: str,
        log,
        cache_dir: Path | None = None,
        devices: int | None = None,
    ):
        self.config, self.label_names, self.workdir, self.log = config, list(label_names), workdir, log
        self.train = train
        cfg = config.train
        self.planner = BatchPlanner.create(cfg, train.lengths, [val.lengths, test.lengths])
        if devices is None and seed_mode == "sequential":
            devices = 1  # seeds stepped in turn use one device
        mesh = SeedMesh.create(devices, cfg.seeds, cfg.batch_size, log)
        mode = resolve_seed_mode(seed_mode, mesh.mesh.size)
        self.seeds = SeedStates(config.model, config.loss, cfg, range(cfg.seeds), mode, cache_dir, mesh)
        self.primary = mesh.primary
        plan = self.planner.train_epoch(train.lengths, self.seeds.seeds, 0, self.seeds.aligned)[0]
        shapes = self.planner.train_shapes(plan)
        real, padded = int(train.lengths.sum()), sum(len(p.conversations) * p.length for p in plan)
        self.shape_info = {
            "batching": cfg.batching,
            "train_shapes": [[cfg.batch_size, t] for t in shapes],
            "pad_lengths": list(self.planner.train_pads),
            "padding_efficiency": padding_efficiency(train.lengths, plan),
            "real_utterances": real,
            "padded_utterances": padded,
            "devices": mesh.describe(),
        }
        log(
            f"{len(shapes)} compiled training shapes [B, T] = {', '.join(f'[{cfg.batch_size}, {t}]' for t in shapes)}; "
            f"{cfg.batching} batches, padding efficiency {self.shape_info['padding_efficiency']:.3f} ({real} real / "
            f"{padded} padded utterances); seeds {self.seeds.seeds} "
            f"{'vmapped in one step' if self.seeds.vmap else 'stepped in turn'}"
            + (f" on a mesh of {mesh.mesh.size} devices {mesh.shape}" if mesh.sharded else "")
        )
        # Every training shape is compiled before the states exist (lower peak memory).
        t0 = time.perf_counter()
        for t in shapes:
            self.seeds.compile(make_batch(train, batch_rows(train, self.planner.example(train.lengths, t))))
        log(f"compiled {len(shapes)} training shapes in {time.perf_counter() - t0:.1f} s")
        self.evaluator = Evaluator(self.seeds, self.planner, {"val": val, "test": test}, label_names)
        self.history: list[dict] = []
        self.best: list[dict | None] = [None] * cfg.seeds
        t0 = time.perf_counter()
        self.seeds.initialise()
        one = abstract_train_state(config.model, cfg)
        self.saved = HostMirror(one, cfg.seeds)
        self.best_params = HostMirror(one.params, cfg.seeds)
        log(f"initialised {cfg.seeds} seed(s) in {time.perf_counter() - t0:.1f} s")

    def _mirrors(self) -> dict:
        """What a checkpoint holds: the host mirrors by name (written and read as whole buffers)."""
        return {"train": self.saved, "best_params": self.best_params}

    def restore(self, ckpt: RunCheckpoints) -> int:
        """Loads the latest checkpoint if there is one; returns the number of epochs already done."""
        self.seeds.mesh.sync("restore")  # the checkpoints as process 0 left them
        if ckpt.latest_epoch() is None:
            return 0
        epoch, meta = ckpt.restore_state(self._mirrors())
        epochs = self.config.train.epochs
        if epoch > epochs:
            raise UsageError(
                f"{self.workdir}: already trained for {epoch} epochs, more than --epochs {epochs} — "
                f"pass --restart to train {epochs} epochs from scratch, or choose another --out (a "
                f"larger --epochs continues this run)"
            )
        self.seeds.load(self.saved.tree)
        self.history, self.best = meta["history"], meta["best"]
        self.log(f"resumed {self.workdir} after epoch {epoch}")
        return epoch

    def train_epoch(self, epoch: int) -> tuple[list[list[dict]], float]:
        """One pass over train for every seed; returns per-seed step metrics and the seconds taken."""
        return train_epoch(self.seeds, self.planner, self.train, epoch)

    def fit(self, ckpt: RunCheckpoints, start_epoch: int, progress: bool) -> None:
        """Trains from ``start_epoch`` to the configured number of epochs."""
        cfg = self.config.train
        metrics_path = self.workdir / "metrics.jsonl"
        if self.primary:
            with open(metrics_path, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(h) + "\n" for h in self.history)
        bar = tqdm(
            total=cfg.epochs,
            initial=start_epoch,
            desc=self.config.model.variant,
            unit="epoch",
            disable=not progress,
            file=sys.stderr,
            dynamic_ncols=True,
        )
        last_save = time.monotonic()
        for epoch in range(start_epoch, cfg.epochs):
            step_metrics, seconds = self.train_epoch(epoch)
            skipped = self.check_finite(epoch, step_metrics, ckpt)
            utterances = sum(int(m["utterances"]) for per_seed in step_metrics for m in per_seed)
            record = {
                "epoch": epoch + 1,
                "train_loss": [float(np.mean([m["loss"] for m in sm])) for sm in step_metrics],
                "train_terms": [
                    {
                        t: float(np.mean([m[t] for m in sm]))
                        for t in sm[0]
                        if t not in ("loss", "utterances", "nonfinite")
                    }
                    for sm in step_metrics
                ],
                "seconds": seconds,
                "utterances_per_second": utterances / seconds,
            }
            if cfg.on_nonfinite == "skip-step":
                record["skipped_nonfinite_steps"] = skipped
            t0 = time.perf_counter()
            ckpt.wait()  # the host mirrors are rewritten below
            waited, t0 = time.perf_counter() - t0, time.perf_counter()
            params = self.seeds.params()
            val = self.evaluator.score("val", params)
            record["val"] = {e: [v["weighted_f1"][e] for v in val] for e in val[0]["weighted_f1"]}
            if cfg.test_every_epoch:
                test = [t["weighted_f1"] for t in self.evaluator.score("test", params, detailed=False)]
                record["test"] = {e: [t[e] for t in test] for e in test[0]}
            better = [k for k in range(cfg.seeds) if improved(self.best[k], val[k])]
            for k in better:
                self.best[k] = {"epoch": epoch + 1, "val": val[k]}
            self.seeds.copy_params_to(self.best_params, better)
            # Wall time beyond the training pass: validation and model selection; the checkpoint's
            # share is waiting for the previous write and the host copies of this one.
            record["validation_seconds"], t0 = time.perf_counter() - t0, time.perf_counter()
            record["checkpoint_seconds"] = waited
            self.history.append(record)
            if self.seeds.mesh.agree(checkpoint_due(cfg, epoch + 1, time.monotonic() - last_save)):
                self.seeds.copy_states_to(self.saved)
                record["checkpoint_seconds"] += time.perf_counter() - t0
                ckpt.save_state(
                    epoch + 1, self._mirrors(), json.loads(json.dumps({"history": self.history, "best": self.best}))
                )
                last_save = time.monotonic()
            if self.primary:
                with open(metrics_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
            bar.update(1)
            bar.set_postfix(
                loss=f"{np.mean(record['train_loss']):.3f}",
                val_f1=f"{np.mean(record['val']['moe']):.3f}",
                utt_s=f"{record['utterances_per_second']:.0f}",
            )
        bar.close()

    def check_finite(self, epoch: int, step_metrics: list[list[dict]], ckpt: RunCheckpoints) -> list[int]:
        """The number of non-finite steps of each seed in this epoch; with ``on_nonfinite="stop"`` the
        first one stops the run (`UsageError`) before anything of this epoch is saved."""
        skipped = [int(sum(bool(m["nonfinite"]) for m in sm)) for sm in step_metrics]
        if self.config.train.on_nonfinite == "skip-step" or not any(skipped):
            return skipped
        k = next(k for k, n in enumerate(skipped) if n)
        step = next(i for i, m in enumerate(step_metrics[k]) if m["nonfinite"])
        m = step_metrics[k][step]
        term = next(
            (f"loss term {t} = {float(m[t])}" for t in LOSS_TERMS if t in m and not np.isfinite(m[t])),
            f"gradient norm = {float(m['grad_norm'])}",
        )
        ckpt.wait()
        last = ckpt.latest_epoch()
        kept = f"the checkpoint of epoch {last} is kept" if last else "no checkpoint was written yet"
        raise UsageError(
            f"epoch {epoch + 1}, step {step + 1} of {len(step_metrics[k])}, seed {self.seeds.seeds[k]}: {term} — "
            f"training stopped, {kept} and no results.json was written; check the features for NaN/inf "
            f"(python -m bridges.check), lower the learning rate (--set learning_rate=...), or pass "
            f"--on-nonfinite skip-step to skip such steps"
        )

    def finish(self, ckpt: RunCheckpoints) -> None:
        """Writes each seed's best parameters to ``checkpoints/best/seed_<s>`` (read by predict) and
        scores them on test (``self.best[k]["test"]``, ``self.test_interval``); the test predictions go to
        ``test_predictions.npz`` (read by `mister_jax.compare`)."""
        for k, seed in enumerate(self.seeds.seeds):
            ckpt.save_best(seed, self.best[k]["epoch"], self.best_params.seed(k))
        params = self.seeds.params_from_host(self.best_params.tree)
        probs = self.evaluator.predict("test", params)
        for k, scores in enumerate(self.evaluator.score_predictions("test", probs)):
            self.best[k]["test"] = scores
        self.test_interval = self.evaluator.intervals("test", probs)
        if not self.primary:
            return
        test = self.evaluator.splits["test"]
        labelled = test.labels >= 0
        write_test_predictions(
            self.workdir / PREDICTIONS,
            test.utterance_ids[labelled],
            test.conversation_ids[labelled],
            test.labels[labelled],
            [np.argmax(p["moe"][labelled], axis=-1) for p in probs],
            self.label_names,
        )
