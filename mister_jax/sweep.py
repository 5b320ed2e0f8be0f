"""Sweeps like the paper's Fig. 3 (γ) and Fig. 8 (λ): every combination of a grid, each a normal run.

    python -m mister_jax.sweep --dataset NAME --grid lambda_con=0,1,2 [--grid alpha_kl=0,1e-3,0.1]
        [--features ROOT] [--seeds K] [--epochs N] [--preset P] [--set key=value ...] [--out DIR]

Each combination trains with `mister_jax.train.train_and_evaluate` into ``DIR/<key>=<value>,...``, so it
resumes when interrupted and is skipped when its ``results.json`` is complete for that configuration.
Then ``DIR/sweep.md`` tabulates validation and test weighted F1 (mean ± std over seeds, the test
interval over conversations) and ``DIR/sweep_<key>.png`` plots both against each swept field (for two
fields or more: averaged over the others' values). On a CPU the combinations run one after the other.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from mister_jax import atomic
from mister_jax.errors import UsageError
from mister_jax.input_pipeline import fit_to_store, open_store
from mister_jax.main import config_from_args, run_options, training_parser
from mister_jax.report import save_figure
from mister_jax.train import train_and_evaluate
from mister_jax.uncertainty import LEVEL


def parse_grid(items: list[str]) -> list[tuple[str, list[str]]]:
    """``["key=v1,v2", ...]`` → ``[(key, [v1, v2]), ...]``; a key given twice or without values is refused."""
    grid = []
    for item in items:
        key, _, values = item.partition("=")
        values = [v.strip() for v in values.split(",") if v.strip()]
        if not key or not values:
            raise UsageError(f"--grid {item}: expected key=value1,value2,...")
        if key in dict(grid):
            raise UsageError(f"--grid {key}: given twice — list all its values in one --grid")
        grid.append((key, values))
    return grid


def combinations(grid: list[tuple[str, list[str]]]) -> list[dict[str, str]]:
    """Every combination of the grid's values, the last key varying fastest."""
    keys = [k for k, _ in grid]
    return [dict(zip(keys, values)) for values in itertools.product(*(v for _, v in grid))]


def run_name(combination: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in combination.items())


def _complete(run: Path, config) -> bool:
    try:
        done = json.loads((run / "results.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    want = {
        "model": dataclasses.asdict(config.model),
        "loss": dataclasses.asdict(config.loss),
        "train": dataclasses.asdict(config.train),
    }
    return done.get("config") == want


def _row(results: dict) -> dict:
    test, val = results["test"], results["val"]
    ci = test.get("weighted_f1_interval", {}).get("pooled")
    return {"val": val["weighted_f1"], "test": test["weighted_f1"], "test_interval": ci}


def write_sweep_report(out: Path, grid: list[tuple[str, list[str]]], rows: list[tuple[dict, dict]]) -> None:
    """``sweep.md`` (one row per combination) and ``sweep_<key>.png`` per swept field."""
    pct = lambda s: f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}"
    keys = [k for k, _ in grid]
    lines = [
        "# Sweep",
        "",
        f"{len(rows)} runs; weighted F1 in % (mean ± std over seeds); test interval: {100 * LEVEL:.0f} % "
        "bootstrap over test conversations, of the seeds' mean.",
        "",
        "| " + " | ".join(keys) + " | val | test | test interval | run |",
        "|" + "---|" * (len(keys) + 4),
    ]
    for combination, row in rows:
        ci = row["test_interval"]
        interval = f"{100 * ci['low']:.2f}–{100 * ci['high']:.2f}" if ci else "—"
        lines.append(
            "| " + " | ".join(combination[k] for k in keys) + f" | {pct(row['val'])} | {pct(row['test'])} | "
            f"{interval} | `{run_name(combination)}` |"
        )
    for key, values in grid:
        fig = Figure(figsize=(4.5, 3.2))
        ax = fig.subplots()
        for split in ("val", "test"):
            means = [np.mean([r[split]["mean"] for c, r in rows if c[key] == v]) for v in values]
            stds = [np.mean([r[split]["std"] for c, r in rows if c[key] == v]) for v in values]
            ax.errorbar(
                range(len(values)),
                100 * np.asarray(means),
                yerr=100 * np.asarray(stds),
                marker="o",
                capsize=3,
                label=split,
            )
        ax.set_xticks(range(len(values)), values)
        ax.set_xlabel(key)
        ax.set_ylabel("weighted F1 (%)")
        ax.legend()
        fig.tight_layout()
        save_figure(fig, out / f"sweep_{key}.png")
        note = " (mean over the other fields' values)" if len(grid) > 1 else ""
        lines += ["", f"![{key}](sweep_{key}.png){note}"]
    atomic.write_text(out / "sweep.md", "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = training_parser("python -m mister_jax.sweep", __doc__)
    parser.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2,...",
        help="a swept field and its values; several --grid: every combination",
    )
    args = parser.parse_args(argv)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    try:
        grid = parse_grid(args.grid)
        if not grid:
            raise UsageError("--grid: give at least one, e.g. --grid lambda_con=0,1,2")
        store = open_store(args.dataset, args.features)
        out = Path(args.out) if args.out else Path("runs") / f"{args.dataset}-sweep"
        options = {**run_options(args, log), "restart": False}
        rows = []
        for combination in combinations(grid):
            swept = [*args.overrides, *(f"{k}={v}" for k, v in combination.items())]
            settings = argparse.Namespace(**{**vars(args), "overrides": swept})
            config = fit_to_store(config_from_args(settings, store.label_names), store)
            run = out / run_name(combination)
            if _complete(run, config):
                log(f"{run}: complete, skipped")
                results = json.loads((run / "results.json").read_text(encoding="utf-8"))
            else:
                log(f"{run}: training")
                results = train_and_evaluate(config, store, run, no_val=args.no_val, **options)
            rows.append((combination, _row(results)))
        write_sweep_report(out, grid, rows)
    except UsageError as err:
        for line in str(err).splitlines():
            log(f"error: {line}")
        return 2
    log(f"wrote {out / 'sweep.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
