"""Batching: padding against randomness, side by side (`mister_jax.batching`, DESIGN §3 "Batches").

For each batching (sorted, shuffled, bucketed at several pool sizes k, random) on two training
splits, IEMOCAP-shaped (the benchmarks' synthetic lengths, `common.conversation_lengths`, batch 8)
and MELD's real training dialogues (`../shared/data/meld/train_sent_emo.csv` when present, batch 32),
over ``--epochs`` epochs of seeds 0..2:

- pads: the pad lengths `choose_pad_lengths` picks (at most ``num_buckets`` = 4, multiples of 2, as
  `TrainConfig`'s defaults), and shapes: how many of them the epochs use;
- eff 1 seed: real utterances / padded slots of seed 0's epochs (min over the epochs in brackets);
  eff own max: the same with each of those batches padded to its own longest (what the rounding to
  the shared pad lengths costs);
- eff 3 aligned: the same for the 3 seeds stepped as one vmapped step (`align_steps`: step i of every
  seed padded to the largest of their pad lengths), and eff 3 unranked: the same alignment when each
  seed's batches come in an order of its own (what ranking by pad length saves);
- kept epoch / kept seed: the fraction of pairs of conversations batched together that are batched
  together again in the next epoch (same seed) and by seed 1 (same epoch); uniformly random batches
  keep about (B - 1) / (M - 1) of them, sorted ones most.

A row "random, own max" pads each random batch to its own longest conversation, as the authors' PyTorch
code does (one shape per batch, no buckets).

    .venv/bin/python benchmarks/batching.py [--epochs 100]
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import PAPER, conversation_lengths  # noqa: E402

from mister_jax.batching import PlannedBatch, align_steps, choose_pad_lengths, epoch_plan  # noqa: E402

MELD_CSV = Path(__file__).resolve().parents[2] / "shared" / "data" / "meld" / "train_sent_emo.csv"
NUM_BUCKETS, MULTIPLE, SEEDS = 4, 2, 3


def meld_lengths() -> np.ndarray | None:
    """Utterances per MELD training dialogue (by ``Dialogue_ID``), or None without the file."""
    if not MELD_CSV.exists():
        return None
    with open(MELD_CSV, encoding="utf-8", newline="") as f:
        counts = Counter(row["Dialogue_ID"] for row in csv.DictReader(f))
    return np.asarray(sorted(counts.values()), dtype=np.int64)


def efficiency(lengths: np.ndarray, plans) -> float:
    """Real utterances / padded slots summed over several plans."""
    slots = sum(len(p.conversations) * p.length for plan in plans for p in plan)
    return len(plans) * float(lengths.sum()) / slots


def pairs(plan) -> set:
    return {(a, b) for p in plan for a in p.conversations for b in p.conversations if 0 <= a < b}


def kept(a: set, b: set) -> float:
    return len(a & b) / len(a) if a else 1.0


def row(name: str, lengths: np.ndarray, batch: int, batching: str, pool_batches: int, epochs: int) -> dict:
    pads = choose_pad_lengths([lengths], batch, NUM_BUCKETS, MULTIPLE, batching, pool_batches)
    plans = [
        [
            epoch_plan(lengths, pads, batch, seed=s, epoch=e, batching=batching, pool_batches=pool_batches)
            for s in range(SEEDS)
        ]
        for e in range(epochs)
    ]  # [epoch][seed]
    one = [efficiency(lengths, [p[0]]) for p in plans]
    own = [
        efficiency(
            lengths,
            [[PlannedBatch(int(lengths[b.conversations[b.conversations >= 0]].max()), b.conversations) for b in p[0]]],
        )
        for p in plans
    ]
    aligned = [align_steps(p) for p in plans]
    unranked = []
    for e, p in enumerate(plans):
        shuffled = [
            [plan[i] for i in np.random.default_rng([s, e, 7]).permutation(len(plan))] for s, plan in enumerate(p)
        ]
        unranked.append(efficiency(lengths, align_steps(shuffled)))
    used = {b.length for p in plans for plan in p for b in plan} | {
        b.length for a in aligned for plan in a for b in plan
    }
    return {
        "name": name,
        "pads": pads,
        "shapes": len(used),
        "eff1": float(np.mean(one)),
        "eff1_min": min(one),
        "eff_own": float(np.mean(own)),
        "eff3": float(np.mean([efficiency(lengths, a) for a in aligned])),
        "eff3_unranked": float(np.mean(unranked)),
        "kept_epoch": float(np.mean([kept(pairs(plans[e][0]), pairs(plans[e + 1][0])) for e in range(epochs - 1)])),
        "kept_seed": float(np.mean([kept(pairs(p[0]), pairs(p[1])) for p in plans])),
    }


def own_max_row(lengths: np.ndarray, batch: int, epochs: int) -> dict:
    """Random batches each padded to its own longest conversation (the authors' DataLoader)."""
    plans = [
        [
            [
                PlannedBatch(int(lengths[b].max()), b)
                for b in np.array_split(
                    np.random.default_rng([s, e]).permutation(len(lengths)), np.arange(batch, len(lengths), batch)
                )
            ]
            for s in range(SEEDS)
        ]
        for e in range(epochs)
    ]
    shapes = {b.length for p in plans for plan in p for b in plan}
    one = [efficiency(lengths, [p[0]]) for p in plans]
    return {
        "name": "random, own max",
        "pads": (),
        "shapes": len(shapes),
        "eff1": float(np.mean(one)),
        "eff1_min": min(one),
        "eff_own": float(np.mean(one)),
        "eff3": float("nan"),
        "eff3_unranked": float("nan"),
        "kept_epoch": float("nan"),
        "kept_seed": float("nan"),
    }


def table(title: str, lengths: np.ndarray, batch: int, pools, epochs: int) -> str:
    rows = [row("sorted", lengths, batch, "sorted", 1, epochs), row("shuffled", lengths, batch, "shuffled", 1, epochs)]
    rows += [row(f"bucketed k={k}", lengths, batch, "bucketed", k, epochs) for k in pools]
    rows += [row("random", lengths, batch, "random", 1, epochs), own_max_row(lengths, batch, epochs)]
    m = len(lengths)
    lines = [
        f"{title}: {m} conversations, {int(lengths.sum())} utterances, lengths {lengths.min()}-{lengths.max()}, "
        f"batch {batch} ({-(-m // batch)} batches), {epochs} epochs x {SEEDS} seeds; uniformly random batches "
        f"keep {(batch - 1) / (m - 1):.3f} of pairs",
        "",
        "| batching | pad lengths | shapes | eff 1 seed (min) | eff own max | eff 3 aligned | eff 3 unranked "
        "| kept epoch | kept seed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    fmt = lambda x: "—" if np.isnan(x) else f"{x:.3f}"
    for r in rows:
        lines.append(
            f"| {r['name']} | {', '.join(map(str, r['pads'])) or 'per batch'} | {r['shapes']} | "
            f"{r['eff1']:.3f} ({r['eff1_min']:.3f}) | {r['eff_own']:.3f} | {fmt(r['eff3'])} | "
            f"{fmt(r['eff3_unranked'])} | "
            f"{fmt(r['kept_epoch'])} | {fmt(r['kept_seed'])} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=100, help="epochs per seed (default 100, a run of the protocol)")
    args = parser.parse_args(argv)
    print(table("IEMOCAP-shaped", conversation_lengths(PAPER), 8, (2, 4, 6, 8, 11), args.epochs))
    meld = meld_lengths()
    print()
    if meld is None:
        print(f"MELD: {MELD_CSV} absent, skipped")
    else:
        print(table("MELD train (real dialogue lengths)", meld, 32, (2, 4, 8, 16), args.epochs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
