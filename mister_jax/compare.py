"""Is run A better than run B, or is it seed noise? A paired comparison on the same test set.

    python -m mister_jax.compare RUN_A RUN_B [--draws R] [--level 0.95]

Both runs must have scored the same labelled test utterances (``test_predictions.npz``, written by
training); it prints a table of each run's test weighted F1 (mean ± std over seeds, with its bootstrap
interval over conversations) and the difference A − B with its paired bootstrap interval and p-value
(`mister_jax.uncertainty.paired_bootstrap`: the same resampled conversations for both, seed k of A
paired with seed k of B).
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np

from mister_jax import atomic, uncertainty
from mister_jax.errors import UsageError

PREDICTIONS = "test_predictions.npz"


def write_test_predictions(path: Path, utterance_ids, conversation_ids, labels, predictions, label_names) -> None:
    """Writes the labelled test utterances and every seed's predicted class ``[K, N]`` atomically."""
    buffer = io.BytesIO()
    np.savez(
        buffer,
        utterance_ids=np.asarray(utterance_ids, str),
        conversation_ids=np.asarray(conversation_ids, str),
        labels=np.asarray(labels, np.int32),
        predictions=np.asarray(predictions, np.int32),
        label_names=np.asarray(label_names, str),
    )
    atomic.write_bytes(path, buffer.getvalue())


def read_test_predictions(run: Path) -> dict:
    """The arrays `write_test_predictions` wrote into ``run``."""
    path = Path(run) / PREDICTIONS
    try:
        with np.load(path) as data:
            return {name: data[name] for name in data.files}
    except FileNotFoundError:
        raise UsageError(
            f"{path}: missing — finish training the run (python -m mister_jax.train writes it at "
            f"the end), or retrain it with this version"
        ) from None
    except (OSError, ValueError) as err:
        raise UsageError(f"{path}: unreadable ({err}) — rerun the training command of that run") from None


def compare_runs(run_a: Path, run_b: Path, draws: int = uncertainty.DRAWS, level: float = uncertainty.LEVEL) -> dict:
    """Each run's pooled interval and the paired difference; refuses runs whose test utterances differ."""
    a, b = read_test_predictions(run_a), read_test_predictions(run_b)
    differs = uncertainty.first_difference(a["utterance_ids"].tolist(), b["utterance_ids"].tolist())
    if differs:
        raise UsageError(
            f"{run_a} and {run_b}: their test utterances differ ({differs}) — compare runs trained "
            f"on the same test split"
        )
    if list(a["label_names"]) != list(b["label_names"]) or not np.array_equal(a["labels"], b["labels"]):
        raise UsageError(
            f"{run_a} and {run_b}: the same utterances carry different labels — compare runs trained on the same store"
        )
    if a["predictions"].shape[0] != b["predictions"].shape[0]:
        raise UsageError(
            f"{run_a} has {a['predictions'].shape[0]} seeds, {run_b} {b['predictions'].shape[0]} — "
            f"a paired comparison needs as many seeds on both sides (--seeds)"
        )
    classes, conversations = len(a["label_names"]), a["conversation_ids"]
    runs = {}
    for name, run in (("A", a), ("B", b)):
        f1 = [
            float(
                uncertainty.weighted_f1_from_confusion(
                    uncertainty.conversation_confusions(run["labels"], p, conversations, classes)
                    .sum(axis=0)
                    .reshape(classes, classes)
                )
            )
            for p in run["predictions"]
        ]
        ci = uncertainty.bootstrap_weighted_f1(run["labels"], run["predictions"], conversations, classes, draws, level)
        runs[name] = {"mean": float(np.mean(f1)), "std": float(np.std(f1)), "interval": ci["pooled"]}
    paired = uncertainty.paired_bootstrap(
        a["labels"], a["predictions"], b["predictions"], conversations, classes, draws, level
    )
    return {
        "runs": runs,
        "difference": paired,
        "utterances": int(len(a["labels"])),
        "conversations": int(len(np.unique(conversations))),
    }


def format_table(result: dict, run_a: Path, run_b: Path) -> str:
    pct = lambda x: f"{100 * x:.2f}"
    level = f"{100 * result['difference']['level']:.0f} %"
    lines = [
        f"test weighted F1 on {result['utterances']} utterances, {result['conversations']} conversations "
        f"(intervals: {level}, bootstrap over conversations)",
        "",
        f"| run | weighted F1 (mean ± std over seeds) | {level} interval |",
        "|---|---|---|",
    ]
    for name, run in (("A", run_a), ("B", run_b)):
        r = result["runs"][name]
        lines.append(
            f"| {name}: {run} | {pct(r['mean'])} ± {pct(r['std'])} | "
            f"[{pct(r['interval']['low'])}, {pct(r['interval']['high'])}] |"
        )
    d = result["difference"]
    lines.append(
        f"| A − B | {pct(d['difference'])} | [{pct(d['low'])}, {pct(d['high'])}], paired p = "
        f"{d['p_value']:.3f} ({d['seeds_paired']} seeds paired) |"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mister_jax.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    parser.add_argument("--draws", type=int, default=uncertainty.DRAWS, help="bootstrap draws (default 1000)")
    parser.add_argument("--level", type=float, default=uncertainty.LEVEL, help="interval level (default 0.95)")
    args = parser.parse_args(argv)
    try:
        if args.draws < 100 or not 0.5 < args.level < 1:
            raise UsageError(
                f"--draws {args.draws} / --level {args.level}: need at least 100 draws and a level in (0.5, 1)"
            )
        result = compare_runs(args.run_a, args.run_b, args.draws, args.level)
    except UsageError as err:
        for line in str(err).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 2
    print(format_table(result, args.run_a, args.run_b))
    return 0


if __name__ == "__main__":
    sys.exit(main())
