"""``report.md`` and its PNG figures for a finished run (DESIGN §5; the paper's Tables 2–4, Fig. 5).

Figures are drawn with matplotlib's object API on an Agg canvas (no display, no global state):
``confusion.png`` (test confusion matrix summed over seeds, rows normalised), ``gate.png`` (mean gate
weight β per expert for each true class), ``experts.png`` (test weighted F1 per expert, mean ± std over
seeds), ``curves.png`` (training loss and validation weighted F1 per epoch and seed, and test weighted F1
when the run evaluated it every epoch).

Every file is written atomically (`mister_jax.atomic`), the figures first and ``report.md`` last: a
failure (a full disk) leaves no truncated file and raises `ReportError` naming the file and why.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from mister_jax import atomic
from mister_jax.metrics import EXPERTS, GATE_EXPERTS


class ReportError(Exception):
    """A report file that could not be written; the message names it and the reason."""


def _write(path: Path, data: bytes) -> None:
    try:
        atomic.write_bytes(path, data)
    except OSError as err:
        raise ReportError(f"{path}: could not be written ({err.strerror or err})") from None


def save_figure(fig: Figure, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    _write(path, buffer.getvalue())


def _pct(stats: dict) -> str:
    return f"{100 * stats['mean']:.1f} ± {100 * stats['std']:.1f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _plot_confusion(path: Path, matrix: np.ndarray, label_names: list[str]) -> None:
    rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    fig = Figure(figsize=(1.0 + 0.7 * len(label_names), 0.8 + 0.7 * len(label_names)))
    ax = fig.add_subplot()
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(label_names)):
        for j in range(len(label_names)):
            ax.text(
                j,
                i,
                f"{rates[i, j]:.2f}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if rates[i, j] > 0.5 else "black",
            )
    ax.set_xticks(range(len(label_names)), label_names, rotation=45, ha="right")
    ax.set_yticks(range(len(label_names)), label_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("test confusion (rows normalised, all seeds)")
    fig.tight_layout()
    save_figure(fig, path)


def _plot_gate(path: Path, per_class: dict, label_names: list[str]) -> None:
    names = [n for n in label_names if n in per_class]
    x = np.arange(len(names))
    fig = Figure(figsize=(1.5 + 0.8 * len(names), 3.2))
    ax = fig.add_subplot()
    for k, expert in enumerate(GATE_EXPERTS):
        ax.bar(x + (k - 1) * 0.27, [per_class[n][expert] for n in names], 0.27, label=f"β {expert}")
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("mean gate weight")
    ax.set_title("gate weights per true class (test, mean over seeds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def _plot_experts(path: Path, experts: dict) -> None:
    names = [e for e in EXPERTS if e in experts]
    fig = Figure(figsize=(4.5, 3.0))
    ax = fig.add_subplot()
    means = [experts[e]["weighted_f1"]["mean"] for e in names]
    stds = [experts[e]["weighted_f1"]["std"] for e in names]
    ax.bar(names, means, yerr=stds, capsize=4, color=["C0", "C1", "C2", "C3"][: len(names)])
    ax.set_ylim(0, 1)
    ax.set_ylabel("test weighted F1")
    ax.set_title("per expert (mean ± std over seeds)")
    fig.tight_layout()
    save_figure(fig, path)


def _plot_curves(path: Path, history: list[dict], seeds: list[int]) -> None:
    epochs = [h["epoch"] for h in history]
    splits = ["val", "test"] if all("test" in h for h in history) else ["val"]
    fig = Figure(figsize=(3 * (1 + len(splits)), 3.2))
    axes = fig.subplots(1, 1 + len(splits))
    for k, seed in enumerate(seeds):
        axes[0].plot(epochs, [h["train_loss"][k] for h in history], label=f"seed {seed}")
        for ax, split in zip(axes[1:], splits):
            ax.plot(epochs, [h[split]["moe"][k] for h in history], label=f"seed {seed}")
    titles = ["training loss (Eq. 18)", "validation weighted F1", "test weighted F1"]
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def _plot_reliability(path: Path, calibration: dict) -> None:
    fig = Figure(figsize=(4.5, 4))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], ":", color="grey", label="calibrated")
    for expert in EXPERTS:
        if expert in calibration:
            c = calibration[expert]
            used = np.asarray(c["count"]) > 0
            ax.plot(np.asarray(c["confidence"])[used], np.asarray(c["accuracy"])[used], marker="o", label=expert)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.legend()
    save_figure(fig, path)


def write_report(out_dir: Path, results: dict, history: list[dict]) -> Path:
    """Writes ``report.md`` and the figures next to ``results.json``; returns the report's path.

    Raises `ReportError` when a file cannot be written (none is left half-written)."""
    out_dir = Path(out_dir)
    labels = results["label_names"]
    test, val = results["test"], results["val"]
    lines = [
        f"# {results['dataset']} — {results['variant']}",
        "",
        f"{len(results['seeds'])} seeds ({', '.join(map(str, results['seeds']))}), "
        f"{results['epochs']} epochs; model picked per seed at the epoch of best validation weighted F1 "
        f"(epochs {', '.join(map(str, results['best_epoch']))}). Scores in %.",
        "",
        "## Weighted F1",
        "",
    ]
    rows = [
        [
            e,
            _pct(val["experts"][e]["weighted_f1"]),
            _pct(test["experts"][e]["weighted_f1"]),
            ", ".join(f"{100 * v:.1f}" for v in test["experts"][e]["weighted_f1"]["per_seed"]),
        ]
        for e in EXPERTS
        if e in test["experts"]
    ]
    lines += _table(["expert", "val", "test", "test per seed"], rows)
    if "weighted_f1_interval" in test:
        ci = test["weighted_f1_interval"]
        per_seed = "; ".join(f"{100 * c['low']:.1f}–{100 * c['high']:.1f}" for c in ci["per_seed"])
        lines += [
            "",
            f"MoE test weighted F1, {100 * ci['level']:.0f} % bootstrap interval over test conversations "
            f"({ci['draws']} draws): mean over seeds {100 * ci['pooled']['low']:.1f}–"
            f"{100 * ci['pooled']['high']:.1f}; per seed {per_seed}.",
        ]
    lines += ["", "![per expert](experts.png)", "", "## Per class (test, MoE)", ""]
    lines += _table(
        ["class", "F1 (mean over seeds)"] + [f"β {e}" for e in GATE_EXPERTS if "gate" in test],
        [
            [n, f"{100 * test['per_class_f1'][n]:.1f}"]
            + (
                [f"{test['gate']['per_class'][n][e]:.2f}" for e in GATE_EXPERTS]
                if "gate" in test and n in test["gate"]["per_class"]
                else []
            )
            for n in labels
        ],
    )
    if "calibration" in test:
        calibration = test["calibration"]
        lines += [
            "",
            "## Calibration (test)",
            "",
            f"Expected calibration error over {len(calibration['moe']['count'])} confidence bins (Guo et al., "
            "2017), mean ± std over seeds; the diagram pools the seeds.",
            "",
        ]
        lines += _table(["expert", "ECE"], [[e, _pct(calibration[e]["ece"])] for e in EXPERTS if e in calibration])
        lines += ["", "![reliability](reliability.png)"]
        _plot_reliability(out_dir / "reliability.png", calibration)
    matrix = np.asarray(test["confusion_matrix"])
    lines += ["", "## Confusion matrix (test, summed over seeds; rows = true class)", ""]
    lines += _table(["true \\ predicted"] + labels, [[n] + [str(v) for v in row] for n, row in zip(labels, matrix)])
    lines += ["", "![confusion](confusion.png)", ""]
    _plot_confusion(out_dir / "confusion.png", matrix, labels)
    _plot_experts(out_dir / "experts.png", test["experts"])
    if "gate" in test:
        mean = test["gate"]["mean"]
        lines += [
            "## Gate weights β (test)",
            "",
            "mean over utterances: " + ", ".join(f"{e} {mean[e]:.3f}" for e in GATE_EXPERTS),
            "",
            "![gate](gate.png)",
            "",
        ]
        _plot_gate(out_dir / "gate.png", test["gate"]["per_class"], labels)
    if history:
        lines += ["## Learning curves", "", "![curves](curves.png)", ""]
        _plot_curves(out_dir / "curves.png", history, results["seeds"])
    path = out_dir / "report.md"
    _write(path, "\n".join(lines).encode("utf-8"))
    return path
