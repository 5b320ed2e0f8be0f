"""Per-utterance predictions of a trained run (DESIGN §6).

    python -m mister_jax.predict --run DIR --dataset NAME [--features ROOT] [--split test]
        [--batch-size B] [--seed S] --out FILE.jsonl
    python -m mister_jax.predict --stream --run DIR [--dataset NAME ...] [--seed S]   (causal runs)

Writes one JSON line per utterance, in store order::

    {"conversation_id", "utterance_id", "label", "prediction", "label_id", "prediction_id",
     "probs": [C], "experts": {"speech": [C], "text": [C], "multimodal": [C]}, "gate": [β^s, β^t, β^m]}

``label`` / ``prediction`` are class names (``label`` is null for unlabelled utterances); all scores are
softmax probabilities. Variants without experts give ``"experts": {}`` and ``"gate": null``. The model is
the best-validation parameters of seed ``S`` (default: the seed with the best validation weighted F1).
Conversations are padded to pad lengths computed from the split alone, never from ``B``, so the
output does not depend on ``--batch-size``. ``--stream`` predicts a causal run's utterances one at a time
as they arrive, on stdin or from the store, each line printed at once (`mister_jax.predict_stream`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
from pathlib import Path

import jax
import numpy as np

from mister_jax import atomic
from mister_jax.batching import BatchPlanner
from mister_jax.calibration import read_temperatures, scale_heads
from mister_jax.checkpoint import CheckpointError, RunCheckpoints
from mister_jax.config import ModelConfig, TrainConfig
from mister_jax.errors import UsageError
from mister_jax.input_pipeline import SplitData, iterate_batches, load_split, open_store, required_modalities
from mister_jax.metrics import GATE_EXPERTS
from mister_jax.params import param_shapes
from mister_jax.runtime.compile_cache import DEFAULT_CACHE, enable_compilation_cache
from mister_jax.steps import predict_step


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mister_jax.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="run directory written by python -m mister_jax.train")
    parser.add_argument("--dataset", help="store name; the store is ROOT/NAME (with --stream: stdin when absent)")
    parser.add_argument("--features", default="features", help="store root")
    parser.add_argument("--split", default="test")
    parser.add_argument("--batch-size", type=int, default=8, help="conversations per forward pass")
    parser.add_argument("--seed", type=int, help="which seed's best parameters (default: best validation F1)")
    parser.add_argument("--out", help="output .jsonl file (not with --stream, which prints to stdout)")
    parser.add_argument(
        "--temperature-scaling",
        action="store_true",
        help="divide each head's logits by its temperature fitted on validation (python -m mister_jax.temperature)",
    )
    parser.add_argument(
        "--stream",
        action="store_true",
        help="causal runs: predict utterances one at a time as they arrive (stdin JSONL, or the store's split)",
    )
    parser.add_argument(
        "--jax-cache",
        default=os.environ.get("MISTER_JAX_CACHE", str(DEFAULT_CACHE)),
        help="persistent compilation cache (default: $MISTER_JAX_CACHE or ~/.cache/mister/jax)",
    )
    return parser.parse_args(argv)


def load_run(run: Path) -> dict:
    path = run / "run_config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(
            f"--run {run}: no run_config.json — train first with `python -m mister_jax.train --out {run}`"
        ) from None
    except (OSError, json.JSONDecodeError) as err:
        raise UsageError(f"{path}: unreadable ({err}) — retrain the run") from None


def choose_seed(run: Path, config: dict, seed: int | None) -> int:
    seeds = list(range(config["train"]["seeds"]))
    if seed is not None:
        if seed not in seeds:
            raise UsageError(f"--seed {seed}: the run has seeds {seeds}")
        return seed
    if len(seeds) == 1:
        return seeds[0]
    path = run / "results.json"
    if not path.exists():
        raise UsageError(f"{path}: missing (training unfinished) — finish training, or pass --seed")
    per_seed = json.loads(path.read_text(encoding="utf-8"))["val"]["weighted_f1"]["per_seed"]
    return seeds[int(np.argmax(per_seed))]


@functools.lru_cache(maxsize=8)
def _jitted_predict_step(model_cfg: ModelConfig):
    """One jitted `predict_step` per configuration, so repeated predictions reuse its compilations."""
    return jax.jit(functools.partial(predict_step, model_cfg=model_cfg))


def predict_arrays(params, model_cfg: ModelConfig, data: SplitData, train_cfg: TrainConfig, batch_size: int) -> dict:
    """``{expert: probs [N, C], "gate": [N, 3]}`` over the rows of ``data``, batches in length-sorted order
    (least padding); every batch is dispatched before the first result is fetched."""
    step = _jitted_predict_step(model_cfg)
    planner = BatchPlanner.create(dataclasses.replace(train_cfg, batch_size=batch_size), data.lengths, [data.lengths])
    batches = list(iterate_batches(data, planner.evaluation(data.lengths)))
    fetched = jax.device_get([step(params, batch) for _, batch in batches])
    arrays = {}
    for (rows, _), out in zip(batches, fetched):
        real = rows >= 0
        for name, v in out.items():
            arrays.setdefault(name, np.zeros((data.num_utterances, v.shape[-1]), np.float32))[rows[real]] = v[real]
    return arrays


def predict_split(
    params, model_cfg: ModelConfig, data: SplitData, train_cfg: TrainConfig, batch_size: int, temperatures=None
):
    """Yields ``(row, {expert: probs [C], "gate": [3]})`` for every utterance of ``data``, in store order;
    the heads ``temperatures`` names (``{head: T}``, `mister_jax.calibration`) temperature-scaled."""
    arrays = scale_heads(predict_arrays(params, model_cfg, data, train_cfg, batch_size), temperatures)
    for row in range(data.num_utterances):
        yield row, {name: v[row] for name, v in arrays.items()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return _main(args)
    except UsageError as err:
        for line in str(err).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 2


def open_run_and_store(run: Path, dataset: str, features: str, split: str):
    """``(run_config, model_cfg, store)`` of a trained run and the store it is applied to, checked to
    match (labels, modalities, dims, split)."""
    config = load_run(run)
    store = open_store(dataset, features)
    if list(store.label_names) != list(config["label_names"]):
        raise UsageError(
            f"{store.directory / 'manifest.json'}: labels {store.label_names} differ from the run's "
            f"{config['label_names']} — predict with the store the run was trained on"
        )
    model_cfg = ModelConfig(**config["model"])
    for m in required_modalities(model_cfg.variant):
        if m not in store.modalities:
            raise UsageError(
                f"{store.directory / 'manifest.json'}: the run needs modality '{m}', which this "
                f"store lacks — extract it with `python -m encoders_torch.extract --modality {m}`"
            )
        if store.modalities[m]["dim"] != getattr(model_cfg, f"{m}_dim"):
            raise UsageError(
                f"{store.directory / 'manifest.json'}: {m} dim {store.modalities[m]['dim']} differs "
                f"from the run's {getattr(model_cfg, f'{m}_dim')} — use the store the run was trained on"
            )
    if split not in store.splits:
        raise UsageError(f"--split {split}: the store has splits {list(store.splits)}")
    return config, model_cfg, store


def restore_best_params(run: Path, model_cfg: ModelConfig, seed: int):
    """Seed ``seed``'s best-validation parameters of ``run`` (host arrays)."""
    target = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), param_shapes(model_cfg))
    try:
        ckpt = RunCheckpoints(run / "checkpoints")
        _, params = ckpt.restore_best(seed, target)
        ckpt.close()
    except CheckpointError as err:
        raise UsageError(str(err)) from None
    return params


def prediction_record(conversation_id: str, utterance_id: str, label: int, names: list, probs: dict) -> dict:
    """One utterance's output line (DESIGN §6) from its ``{expert: probs [C], "gate": [3]}``."""
    prediction = int(np.argmax(probs["moe"]))
    return {
        "conversation_id": conversation_id,
        "utterance_id": utterance_id,
        "label": names[label] if label >= 0 else None,
        "prediction": names[prediction],
        "label_id": label,
        "prediction_id": prediction,
        "probs": probs["moe"].tolist(),
        "experts": {e: probs[e].tolist() for e in GATE_EXPERTS if e in probs},
        "gate": probs["gate"].tolist() if "gate" in probs else None,
    }


def _main(args: argparse.Namespace) -> int:
    if args.stream:
        from mister_jax import predict_stream  # it builds on this module's run loading

        return predict_stream.run(args)
    for flag, value in (("--dataset", args.dataset), ("--out", args.out)):
        if value is None:
            raise UsageError(
                f"{flag} is required (or pass --stream to predict a causal run's utterances as they arrive)"
            )
    run = Path(args.run)
    if args.batch_size < 1:
        raise UsageError(f"--batch-size {args.batch_size}: must be >= 1")
    config, model_cfg, store = open_run_and_store(run, args.dataset, args.features, args.split)
    seed = choose_seed(run, config, args.seed)
    enable_compilation_cache(args.jax_cache)
    params = restore_best_params(run, model_cfg, seed)
    data = load_split(store, args.split, required_modalities(model_cfg.variant))
    names = list(store.label_names)
    out = Path(args.out)
    lines = [None] * data.num_utterances
    temperatures = read_temperatures(run, seed) if args.temperature_scaling else None
    train_cfg = TrainConfig(**config["train"])
    for row, probs in predict_split(params, model_cfg, data, train_cfg, args.batch_size, temperatures):
        ids = str(data.conversation_ids[row]), str(data.utterance_ids[row])
        lines[row] = json.dumps(prediction_record(*ids, int(data.labels[row]), names, probs))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_text(out, "\n".join(lines) + "\n")
    except OSError as err:
        raise UsageError(f"--out {out}: cannot write there ({err.strerror}) — choose a writable path") from None
    print(f"wrote {data.num_utterances} predictions of seed {seed} to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
