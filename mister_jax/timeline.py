"""A timeline figure per conversation from a predictions JSONL (`mister_jax.predict`, DESIGN §6).

    python -m mister_jax.timeline PRED.jsonl --out DIR

Writes ``DIR/<conversation_id>.png`` for every conversation (characters other than letters, digits,
``.``, ``_`` and ``-`` become ``_``). Utterances run along x in the file's (dialogue) order. The upper
panel has one bar per utterance, as high as the probability of the predicted emotion and coloured by
it, the emotion's name on it and, for labelled utterances, the true emotion's name below the axis
(red when it differs); the lower panel stacks the gate weights β^s, β^t, β^m (Eq. 10, 11), which say how
much the speech, text and multimodal experts decided the prediction. Runs without a gate leave the
lower panel empty and say so.

Drawn with matplotlib's object API on an Agg canvas, written atomically like the run report
(`mister_jax.report`).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from mister_jax.errors import UsageError
from mister_jax.metrics import GATE_EXPERTS
from mister_jax.report import ReportError, save_figure

KEYS = ("conversation_id", "utterance_id", "label", "prediction", "prediction_id", "probs", "gate")
GATE_COLOURS = ("tab:gray", "tab:olive", "tab:cyan")  # tab10 colours no 7-class emotion uses


def read_predictions(path: Path) -> dict[str, list[dict]]:
    """Conversation id → its prediction lines, in file order; a bad line is a `UsageError` naming it."""
    conversations: dict[str, list[dict]] = {}
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise UsageError(f"{path}: cannot be read ({err.strerror or err}) — pass a predictions .jsonl file") from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            missing = [k for k in KEYS if k not in row] if isinstance(row, dict) else list(KEYS)
        except json.JSONDecodeError:
            missing = list(KEYS)
        if missing:
            raise UsageError(
                f"{path}:{number}: not a prediction line (no {', '.join(missing)}) — pass the JSONL that "
                "python -m mister_jax.predict writes"
            )
        conversations.setdefault(str(row["conversation_id"]), []).append(row)
    if not conversations:
        raise UsageError(f"{path}: no predictions — pass the JSONL that python -m mister_jax.predict writes")
    return conversations


def file_name(conversation_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", conversation_id) + ".png"


def timeline_figure(conversation_id: str, rows: list[dict]) -> Figure:
    """The figure of one conversation's prediction lines (module docstring)."""
    n = len(rows)
    x = np.arange(n)
    top = np.array([r["probs"][r["prediction_id"]] for r in rows])
    palette = colormaps["tab10"]
    fig = Figure(figsize=(min(max(5.0, 2.5 + 0.45 * n), 40.0), 5.2), layout="constrained")
    ax_top, ax_gate = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    ax_top.bar(x, top, color=[palette(r["prediction_id"] % 10) for r in rows], width=0.8)
    for i, r in enumerate(rows):
        ax_top.text(i, top[i] + 0.02, r["prediction"], rotation=90, ha="center", va="bottom", fontsize=8)
        if r["label"] is not None:
            colour = "black" if r["label"] == r["prediction"] else "red"
            ax_top.text(i, -0.03, r["label"], rotation=90, ha="center", va="top", fontsize=7, color=colour)
    shown = sorted({(r["prediction_id"], r["prediction"]) for r in rows})
    handles = [Patch(color=palette(k % 10), label=name) for k, name in shown]
    ax_top.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    ax_top.set_ylim(0, 1.45)
    ax_top.set_yticks([0, 0.5, 1])
    ax_top.set_ylabel("p(predicted emotion)")
    ax_top.set_title(f"{conversation_id} (true emotion under the axis, red when missed)", fontsize=9)
    if all(r["gate"] is not None for r in rows):
        gate = np.array([r["gate"] for r in rows])
        bottom = np.zeros(n)
        for k, (expert, colour) in enumerate(zip(GATE_EXPERTS, GATE_COLOURS)):
            ax_gate.bar(x, gate[:, k], bottom=bottom, color=colour, width=0.8, label=f"β {expert}")
            bottom += gate[:, k]
        ax_gate.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    else:
        ax_gate.text(0.5, 0.5, "no gate: this run's variant has no experts", ha="center", transform=ax_gate.transAxes)
    ax_gate.set_ylim(0, 1)
    ax_gate.set_ylabel("gate β")
    ax_gate.set_xticks(x, [str(r["utterance_id"]) for r in rows], rotation=90, fontsize=7)
    ax_gate.set_xlim(-0.6, n - 0.4)
    return fig


def write_timelines(predictions: Path, out: Path) -> list[Path]:
    """One PNG per conversation of ``predictions`` in ``out``; returns their paths."""
    conversations = read_predictions(predictions)
    names = [file_name(c) for c in conversations]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise UsageError(
            f"{predictions}: conversations {', '.join(c for c in conversations if file_name(c) in clash)} "
            f"would share the file name {clash[0]} — give them ids that differ in letters or digits"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for (conversation_id, rows), name in zip(conversations.items(), names):
            save_figure(timeline_figure(conversation_id, rows), out / name)
            paths.append(out / name)
    except (OSError, ReportError) as err:
        raise UsageError(f"--out {out}: cannot write the figures ({err}) — choose a writable folder") from None
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mister_jax.timeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("predictions", type=Path, help="JSONL written by python -m mister_jax.predict")
    parser.add_argument("--out", required=True, type=Path, help="folder for one PNG per conversation")
    args = parser.parse_args(argv)
    try:
        paths = write_timelines(args.predictions, args.out)
    except UsageError as err:
        for line in str(err).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 2
    print(f"wrote {len(paths)} timelines to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
