"""`python -m bridges.check STORE`: print a store's summary and exit 0, or one line per problem and exit 1.

The summary names, per modality that records them, the sessions its encoder was fine-tuned and
selected on (the manifest's ``encoders``, `bridges.store`)."""

from __future__ import annotations

import argparse
import sys

import numpy as np

from bridges.store import FeatureStore, StoreError


def summary(store: FeatureStore) -> str:
    lines = [f"{store.directory}: {store.dataset}, {len(store.label_names)} classes {store.label_names}"]
    for name in store.splits:
        split = store.split(name)
        counts = np.bincount(split.labels[split.labels >= 0], minlength=len(store.label_names))
        histogram = ", ".join(f"{label} {n}" for label, n in zip(store.label_names, counts))
        unlabelled = int((split.labels < 0).sum())
        lines.append(
            f"  {name}: {len(split.conversations())} conversations, {len(split)} utterances; {histogram}"
            + (f", unlabelled {unlabelled}" if unlabelled else "")
        )
    for modality, spec in store.modalities.items():
        lines.append(f"  {modality}: dim {spec['dim']}, {spec['dtype']}, source {spec.get('source', {})}")
        record = store.encoders.get(modality)
        if record is not None:
            fold = f"fold {record['fold']}, " if record.get("fold") is not None else ""
            lines.append(
                f"    encoder: {fold}fine-tuned on {', '.join(record['trained_on']) or 'no session'}, "
                f"selected on {', '.join(record['selected_on']) or 'no session'}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bridges.check", description=__doc__)
    parser.add_argument("store", help="the dataset folder, <root>/<dataset>")
    args = parser.parse_args(argv)
    try:
        store = FeatureStore.open(args.store)
        problems = store.check_values()
    except StoreError as e:
        problems = e.problems
    if problems:
        print("\n".join(problems))
        return 1
    print(summary(store))
    return 0


if __name__ == "__main__":
    sys.exit(main())
