"""The built-in demo corpus: a small synthetic feature store that behaves like the real task.

What makes it a fair stand-in for ERC (and what each expert of MiSTER-E can exploit):

- Emotions persist along a conversation: each conversation has a mood, and each utterance keeps the
  previous emotion with probability `persistence`, else draws from a mood-tilted, imbalanced prior.
- Classes are imbalanced (neutral and frustrated are common, happy is rare), as in IEMOCAP.
- Text and speech carry partial and *different* evidence: text cannot tell angry from frustrated nor
  happy from excited (lexically alike); speech cannot tell sad from neutral nor angry from excited
  (prosodically alike). Only the two together separate every class.
- A fraction of utterances (`ambiguous`) carry almost no evidence in either modality: only their
  context can resolve them.

Deterministic from the seed, written through the same writer as real features, NumPy only.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from bridges.store import init_store, write_index, write_modality

LABEL_NAMES = ("angry", "happy", "sad", "neutral", "excited", "frustrated")
CLASS_PRIOR = (0.12, 0.07, 0.13, 0.30, 0.15, 0.23)
# Pairs of classes whose evidence coincides in one modality.
TEXT_CONFUSIONS = (("angry", "frustrated"), ("happy", "excited"))
SPEECH_CONFUSIONS = (("sad", "neutral"), ("angry", "excited"))


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    conversations: tuple[tuple[str, int], ...] = (("train", 120), ("val", 30), ("test", 40))
    min_length: int = 8
    max_length: int = 32
    text_dim: int = 48
    speech_dim: int = 32
    persistence: float = 0.8
    ambiguous: float = 0.2
    noise: float = 3.0
    pair_separation: float = 0.1
    seed: int = 0


def _prototypes(rng: np.random.Generator, dim: int, confusions, separation: float) -> np.ndarray:
    """Class means [C, dim]; confused pairs share a mean up to `separation`."""
    means = rng.normal(size=(len(LABEL_NAMES), dim))
    for a, b in confusions:
        i, j = LABEL_NAMES.index(a), LABEL_NAMES.index(b)
        shared = (means[i] + means[j]) / 2
        offset = rng.normal(size=dim) * separation
        means[i], means[j] = shared + offset, shared - offset
    return means


def _labels(rng: np.random.Generator, length: int, config: DemoConfig) -> np.ndarray:
    """A Markov chain of emotions around the conversation's mood: [length] int32."""
    prior = np.asarray(CLASS_PRIOR)
    mood = rng.choice(len(prior), p=prior)
    tilted = prior.copy()
    tilted[mood] += 1.0
    tilted /= tilted.sum()
    labels = np.empty(length, np.int32)
    labels[0] = rng.choice(len(prior), p=tilted)
    for t in range(1, length):
        keep = rng.random() < config.persistence
        labels[t] = labels[t - 1] if keep else rng.choice(len(prior), p=tilted)
    return labels


def build_demo_store(root: str | os.PathLike, seed: int = 0, config: DemoConfig | None = None) -> Path:
    """Writes the demo store to `<root>/demo` and returns that folder."""
    config = config or dataclasses.replace(DemoConfig(), seed=seed)
    rng = np.random.default_rng(config.seed)
    text_means = _prototypes(rng, config.text_dim, TEXT_CONFUSIONS, config.pair_separation)
    speech_means = _prototypes(rng, config.speech_dim, SPEECH_CONFUSIONS, config.pair_separation)
    dataset_dir = init_store(root, "demo", LABEL_NAMES, [name for name, _ in config.conversations])
    source = {"generator": "bridges.demo", "seed": config.seed}
    for split, n_conversations in config.conversations:
        utterance_ids, conversation_ids, labels = [], [], []
        for c in range(n_conversations):
            length = int(rng.integers(config.min_length, config.max_length + 1))
            labels.append(_labels(rng, length, config))
            conversation_ids += [f"{split}_{c:04d}"] * length
            utterance_ids += [f"{split}_{c:04d}_u{t:03d}" for t in range(length)]
        labels = np.concatenate(labels)
        evidence = np.where(rng.random(len(labels)) < config.ambiguous, 0.15, 1.0)[:, None]  # [N, 1]
        text = evidence * text_means[labels] + config.noise * rng.normal(size=(len(labels), config.text_dim))
        speech = evidence * speech_means[labels] + config.noise * rng.normal(size=(len(labels), config.speech_dim))
        write_index(dataset_dir, split, utterance_ids, conversation_ids, labels)
        write_modality(dataset_dir, split, "text", text.astype(np.float32), source)
        write_modality(dataset_dir, split, "speech", speech.astype(np.float32), source)
    return dataset_dir


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bridges.demo", description="Write the demo feature store.")
    parser.add_argument("--out", default="features", help="store root; the store goes to ROOT/demo")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(build_demo_store(args.out, seed=args.seed))


if __name__ == "__main__":
    main()
