"""Learning-curve parity with the authors' model: is `mister_jax` the same model, and does it learn alike?

    .venv/bin/python benchmarks/parity.py [--steps 50] [--epochs 30] [--seeds 3] [--parts exact,curves]

Two parts, written to benchmarks/results/parity.json and docs/parity.png (`docs/PARITY.md` reads them):

exact   From the same initial weights (a random state_dict of the PyTorch reference with the authors'
        layout, `benchmarks/torch_reference.py`, imported by `mister_jax.import_torch`), dropout off,
        the same batches of equal-length conversations (nothing padded, so the authors' unmasked
        attention and our masked one compute the same thing), both sides take `--steps` Adam steps
        with the losses of the authors-code preset; the loss of every step is compared.
curves  Each side with its own initialisation, dropout and batching, `--seeds` seeds × `--epochs`
        epochs on a synthetic corpus where context and both modalities matter (`HARD`: weak
        per-utterance evidence, modality-specific confusions, sticky emotions), at reduced widths:
        validation weighted F1 (MoE) per epoch. The reference trains with the authors' random
        batches padded to each batch's longest conversation; ours runs through
        `python -m mister_jax.train --preset authors-code` with several batchings and initialisations.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from common import RESULTS_DIR, machine_info, write_result  # noqa: E402

from bridges.demo import DemoConfig, build_demo_store  # noqa: E402

# Weak evidence per utterance (noise 5 against unit-norm-scale class means, 35 % nearly empty
# utterances), emotions that persist (0.9), and per-modality confusions (bridges.demo).
HARD = DemoConfig(
    conversations=(("train", 120), ("val", 30), ("test", 31)),
    min_length=12,
    max_length=48,
    text_dim=64,
    speech_dim=64,
    persistence=0.9,
    ambiguous=0.35,
    noise=5.0,
    seed=11,
)
# Reduced widths for the curves (the paper's: H 512, Hf 1024, attention 120, 3 GRU and 4 fusion layers).
CURVE_DIMS = dict(can_hidden=32, gru_layers=2, fusion_dim=64, fusion_layers=2, attention_dim=24)
CURVE_LEARNING_RATE = 1e-4
CURVE_BATCH = 8
OURS = {  # label: --set overrides on top of --preset authors-code
    "ours, PyTorch init, random batches": ["batching=random"],
    "ours, PyTorch init, bucketed batches": ["batching=bucketed"],
    "ours, flax init, random batches": ["batching=random", "init=flax"],
}


def build_store(root: Path) -> Path:
    """The `HARD` corpus as a feature store under ``root/demo``."""
    return build_demo_store(root, config=HARD)


def run_ours(label: str, sets: list[str], features: Path, work: Path, epochs: int, seeds: int) -> dict:
    """Validation MoE weighted F1 [epoch][seed] of one configuration, through the training CLI."""
    out = work / label.replace(", ", "_").replace(" ", "-")
    args = [
        sys.executable,
        "-m",
        "mister_jax.train",
        "--dataset",
        "demo",
        "--features",
        str(features),
        "--out",
        str(out),
        "--preset",
        "authors-code",
        "--epochs",
        str(epochs),
        "--seeds",
        str(seeds),
        "--quiet",
        "--restart",
    ]
    dims = {
        **CURVE_DIMS,
        "speech_dim": HARD.speech_dim,
        "learning_rate": CURVE_LEARNING_RATE,
        "batch_size": CURVE_BATCH,
        "num_buckets": 4,
    }
    for item in [f"{k}={v}" for k, v in dims.items()] + sets:
        args += ["--set", item]
    t0 = time.perf_counter()
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{label}: training failed:\n{proc.stderr[-3000:]}")
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"val_f1": [h["val"]["moe"] for h in history], "seconds": time.perf_counter() - t0, "sets": sets}


def _reference_dims(**overrides):
    from common import PAPER

    return dataclasses.replace(PAPER, attention_heads=3, **overrides)


def exactness(steps: int, length: int, batch_size: int, learning_rate: float) -> dict:
    """Per-step training loss of the reference and of ours from the same weights, dropout off, at paper
    dims on unpadded batches of ``batch_size`` conversations of ``length`` utterances."""
    import jax
    import jax.numpy as jnp
    import torch
    from torch_reference import AttentionMoE, train_step

    from mister_jax.config import LossConfig, TrainConfig
    from mister_jax.configs import authors_code
    from mister_jax.import_torch import params_from_state_dict
    from mister_jax.input_pipeline import Batch
    from mister_jax.steps import TrainState, init_optimizer_state, make_optimizer
    from mister_jax.steps import train_step as jax_train_step

    dims = _reference_dims()
    torch.manual_seed(0)
    reference = AttentionMoE(dims).eval()  # eval: no dropout
    state_dict = {k: v.detach().numpy().copy() for k, v in reference.state_dict().items()}
    model_cfg, params = params_from_state_dict(state_dict)
    model_cfg = dataclasses.replace(model_cfg, fusion_dropout=0.0, attention_dropout=0.0)
    loss_kwargs = dict(gamma=3.0, lambda_con=2.0, alpha_kl=0.1, temperature=1.0)
    loss_cfg = LossConfig(**loss_kwargs, **authors_code.LOSS)
    train_cfg = TrainConfig(batch_size=batch_size, learning_rate=learning_rate)
    train = jax.jit(
        functools.partial(jax_train_step, model_cfg=model_cfg, loss_cfg=loss_cfg, tx=make_optimizer(train_cfg)),
        donate_argnums=0,
    )
    state = TrainState(jnp.zeros((), jnp.int32), params, init_optimizer_state(params, train_cfg))
    optimizer = torch.optim.Adam(reference.parameters(), lr=learning_rate)
    rng = np.random.default_rng(0)
    ours, theirs, seconds = [], [], {"ours": 0.0, "reference": 0.0}
    for step in range(steps):
        speech = rng.standard_normal((batch_size, length, dims.speech_dim), dtype=np.float32)
        text = rng.standard_normal((batch_size, length, dims.text_dim), dtype=np.float32)
        labels = rng.integers(0, dims.num_classes, (batch_size, length)).astype(np.int32)
        mask = np.ones((batch_size, length), bool)
        t0 = time.perf_counter()
        state, metrics = train(state, Batch(speech, text, labels, mask), jax.random.key(0))
        ours.append(float(metrics["loss"]))
        seconds["ours"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        theirs.append(
            train_step(
                reference, optimizer, *(torch.from_numpy(x) for x in (speech, text, labels, mask)), **loss_kwargs
            )
        )
        seconds["reference"] += time.perf_counter() - t0
    relative = [abs(a - b) / abs(b) for a, b in zip(ours, theirs)]
    return {
        "steps": steps,
        "batch": [batch_size, length],
        "learning_rate": learning_rate,
        "dims": dataclasses.asdict(dims),
        "loss_ours": ours,
        "loss_reference": theirs,
        "max_relative_difference": max(relative),
        "seconds": seconds,
    }


def _weighted_f1(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(labels, predictions, labels=np.arange(num_classes), average="weighted", zero_division=0))


def run_reference(features: Path, epochs: int, seeds: int) -> dict:
    """Validation MoE weighted F1 [epoch][seed] of the PyTorch reference trained the authors' way: its own
    initialisation and dropout, random batches per seed and epoch padded to their longest conversation,
    no masks inside the model (the losses count real utterances only). Validation runs one
    conversation at a time, so padding never touches the scores."""
    import torch
    from torch_reference import AttentionMoE, train_step

    from bridges import FeatureStore

    store = FeatureStore.open(features / "demo")

    def conversations(split):
        sp = store.split(split)
        speech, text, ids = np.asarray(sp.features("speech")), np.asarray(sp.features("text")), sp.conversation_ids
        edges = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1], True])
        return [(speech[a:b], text[a:b], sp.labels[a:b]) for a, b in zip(edges[:-1], edges[1:])]

    train, val = conversations("train"), conversations("val")
    dims = _reference_dims(speech_dim=HARD.speech_dim, text_dim=HARD.text_dim, num_classes=6, **CURVE_DIMS)
    curves = np.zeros((epochs, seeds))
    t0 = time.perf_counter()
    for seed in range(seeds):
        torch.manual_seed(seed)
        model = AttentionMoE(dims)
        optimizer = torch.optim.Adam(model.parameters(), lr=CURVE_LEARNING_RATE)
        for epoch in range(epochs):
            model.train()
            order = np.random.default_rng([seed, epoch]).permutation(len(train))
            for start in range(0, len(order), CURVE_BATCH):
                members = [train[i] for i in order[start : start + CURVE_BATCH]]
                width = max(len(m[2]) for m in members)
                pad = lambda x: np.pad(x, ((0, width - len(x)),) + ((0, 0),) * (x.ndim - 1))
                speech = np.stack([pad(m[0]) for m in members]).astype(np.float32)
                text = np.stack([pad(m[1]) for m in members]).astype(np.float32)
                labels = np.stack([np.pad(m[2], (0, width - len(m[2])), constant_values=-1) for m in members])
                tensors = [torch.from_numpy(x) for x in (speech, text, labels.astype(np.int64), labels >= 0)]
                train_step(model, optimizer, *tensors, gamma=3.0, lambda_con=2.0, alpha_kl=0.1, temperature=1.0)
            model.eval()
            predictions, truth = [], []
            with torch.no_grad():
                for speech, text, labels in val:
                    out = model(
                        torch.from_numpy(speech[None].astype(np.float32)),
                        torch.from_numpy(text[None].astype(np.float32)),
                    )
                    predictions.append(out["logits"][0].argmax(-1).numpy())
                    truth.append(labels)
            curves[epoch, seed] = _weighted_f1(np.concatenate(truth), np.concatenate(predictions), 6)
    return {"val_f1": curves.tolist(), "seconds": time.perf_counter() - t0}


def within_spread(curve: np.ndarray, reference: np.ndarray) -> float:
    """Fraction of epochs where the mean over seeds of ``curve`` [E, K] lies within the reference's range
    over its seeds (min to max) at that epoch."""
    mean = curve.mean(axis=1)
    return float(np.mean((mean >= reference.min(axis=1)) & (mean <= reference.max(axis=1))))


def plot(result: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 3.6))
    left, right = fig.subplots(1, 2)
    exact = result.get("exact")
    if exact:
        steps = np.arange(1, exact["steps"] + 1)
        left.plot(steps, exact["loss_reference"], label="PyTorch reference (authors' layout)", lw=2)
        left.plot(steps, exact["loss_ours"], "--", label="mister_jax, imported weights")
        left.set_title(
            f"same weights, dropout off: max relative difference {exact['max_relative_difference']:.1e}", fontsize=8
        )
        left.set_xlabel("Adam step")
        left.set_ylabel("training loss (Eq. 18, authors-code terms)")
        left.legend(fontsize=7)
    curves = result.get("curves", {})
    for k, (label, run) in enumerate(curves.items()):
        values = np.asarray(run["val_f1"])
        epochs = np.arange(1, len(values) + 1)
        right.plot(epochs, values.mean(axis=1), color=f"C{k}", label=label)
        right.fill_between(epochs, values.min(axis=1), values.max(axis=1), color=f"C{k}", alpha=0.15)
    if curves:
        right.set_title("validation weighted F1 (MoE), mean and range over seeds", fontsize=8)
        right.set_xlabel("epoch")
        right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="exact,curves")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--learning-rate", type=float, default=1e-5, help="of the exactness part (paper: 1e-5)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS_DIR / "parity.json"))
    parser.add_argument("--plot", default=str(REPO / "docs" / "parity.png"))
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    result = {"machine": machine_info(), "command": " ".join(sys.argv)}
    if "exact" in parts:
        result["exact"] = exactness(args.steps, length=16, batch_size=4, learning_rate=args.learning_rate)
        print(
            f"exact: {args.steps} steps, max relative loss difference {result['exact']['max_relative_difference']:.2e}"
            f" (first {result['exact']['loss_ours'][0]:.5f} vs {result['exact']['loss_reference'][0]:.5f}, last "
            f"{result['exact']['loss_ours'][-1]:.5f} vs {result['exact']['loss_reference'][-1]:.5f})",
            flush=True,
        )
    if "curves" in parts:
        with tempfile.TemporaryDirectory() as tmp:
            features = Path(tmp) / "features"
            build_store(features)
            curves = {
                "PyTorch reference (authors' model and batches)": run_reference(features, args.epochs, args.seeds)
            }
            for label, sets in OURS.items():
                curves[label] = run_ours(label, sets, features, Path(tmp), args.epochs, args.seeds)
        reference = np.asarray(next(iter(curves.values()))["val_f1"])
        for label, run in curves.items():
            values = np.asarray(run["val_f1"])
            run["within_reference_spread"] = within_spread(values, reference)
            run["final_mean"] = float(values[-1].mean())
            print(
                f"{label}: final val F1 {values[-1].mean():.3f} (range {values[-1].min():.3f}-{values[-1].max():.3f}),"
                f" mean within the reference's seed range at {100 * run['within_reference_spread']:.0f} % of epochs,"
                f" {run['seconds']:.0f} s",
                flush=True,
            )
        result["curves"] = curves
        result["curve_setup"] = {
            "corpus": dataclasses.asdict(HARD),
            "dims": CURVE_DIMS,
            "learning_rate": CURVE_LEARNING_RATE,
            "batch_size": CURVE_BATCH,
        }
    write_result(result, args.out)
    plot(result, Path(args.plot))
    print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
