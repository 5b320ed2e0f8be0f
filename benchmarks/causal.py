"""What the future is worth (#22): causal against bidirectional MiSTER-E, trained alike on two synthetic
corpora and compared on the same test conversations.

    .venv/bin/python benchmarks/causal.py [--corpora demo,hard] [--epochs 20] [--seeds 3] [--work DIR]
        [--out FILE]

Corpora: ``demo``, the built-in demo store (`bridges.demo` defaults, what scripts/demo.sh trains on),
and ``hard``, the corpus of the parity study (`benchmarks/parity.py: HARD`: sticky emotions, a third of
the utterances with almost no evidence, modality-specific confusions), where context matters more.
On each, ``python -m mister_jax.train --dataset demo`` (the demo preset) runs twice, as in the paper
and with ``--set causal=true``, with the same seeds; then `mister_jax.compare` (the code of
``python -m mister_jax.compare``) gives each run's test weighted F1 (mean ± std over seeds, bootstrap
interval over conversations) and the paired difference bidirectional − causal. Prints each
comparison and a Markdown table; writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from common import RESULTS_DIR, machine_info, write_result  # noqa: E402

from bridges.demo import DemoConfig, build_demo_store  # noqa: E402
from mister_jax.compare import compare_runs, format_table  # noqa: E402

MODES = {"bidirectional": [], "causal": ["--set", "causal=true"]}


def corpus(name: str) -> DemoConfig:
    if name == "hard":
        from parity import HARD

        return HARD
    return DemoConfig()


def train(features: Path, out: Path, epochs: int, seeds: int, extra: list[str]) -> float:
    """One training run through the command line; returns its wall time in seconds."""
    command = [sys.executable, "-m", "mister_jax.train", "--dataset", "demo", "--features", str(features)]
    command += ["--out", str(out), "--epochs", str(epochs), "--seeds", str(seeds), "--quiet", *extra]
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=HERE.parent)
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpora", default="demo,hard", help="comma-separated: demo, hard")
    parser.add_argument("--epochs", type=int, default=20, help="the demo preset's 20")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--work", default="runs/causal", help="stores and run directories go here")
    parser.add_argument("--out", default=str(RESULTS_DIR / "causal.json"))
    args = parser.parse_args(argv)
    work = Path(args.work)
    result = {"epochs": args.epochs, "seeds": args.seeds, "corpora": {}, "machine": machine_info()}
    rows = []
    for name in args.corpora.split(","):
        features = work / name / "features"
        if not (features / "demo" / "manifest.json").exists():
            build_demo_store(features, config=corpus(name))
        runs = {mode: work / name / mode for mode in MODES}
        seconds = {mode: train(features, runs[mode], args.epochs, args.seeds, extra) for mode, extra in MODES.items()}
        comparison = compare_runs(runs["bidirectional"], runs["causal"])
        print(f"\n{name}: A = bidirectional, B = causal\n" + format_table(comparison, *runs.values()), flush=True)
        result["corpora"][name] = {"comparison": comparison, "train_seconds": seconds}
        pct = lambda x: f"{100 * x:.2f}"
        cell = lambda r: (
            f"{pct(r['mean'])} ± {pct(r['std'])} [{pct(r['interval']['low'])}, {pct(r['interval']['high'])}]"
        )
        d = comparison["difference"]
        rows.append(
            f"| {name} | {cell(comparison['runs']['A'])} | {cell(comparison['runs']['B'])} | "
            f"{pct(d['difference'])} [{pct(d['low'])}, {pct(d['high'])}], p = {d['p_value']:.3f} |"
        )
    print("\n| corpus | bidirectional | causal | bidirectional − causal |\n|---|---|---|---|\n" + "\n".join(rows))
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
