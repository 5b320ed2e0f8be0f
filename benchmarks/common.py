"""Shared pieces of the benchmarks: IEMOCAP-shaped synthetic data, batching, padding and machine facts.

NumPy only, so that both the PyTorch reference and the JAX side use the very same conversations.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import resource
import sys
from pathlib import Path

import numpy as np

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclasses.dataclass(frozen=True)
class Dims:
    """Model and data sizes of one benchmark run (DESIGN §3, §5)."""

    speech_dim: int
    text_dim: int
    num_classes: int
    can_hidden: int
    gru_layers: int
    fusion_dim: int
    fusion_layers: int
    attention_dim: int
    attention_heads: int
    num_conversations: int
    total_utterances: int
    min_length: int
    max_length: int
    batch_size: int


PAPER = Dims(
    speech_dim=2048,
    text_dim=2048,
    num_classes=6,
    can_hidden=512,
    gru_layers=3,
    fusion_dim=1024,
    fusion_layers=4,
    attention_dim=120,
    attention_heads=4,
    num_conversations=92,
    total_utterances=4791,
    min_length=24,
    max_length=110,
    batch_size=8,
)

TINY = Dims(
    speech_dim=16,
    text_dim=12,
    num_classes=6,
    can_hidden=8,
    gru_layers=1,
    fusion_dim=16,
    fusion_layers=1,
    attention_dim=8,
    attention_heads=2,
    num_conversations=10,
    total_utterances=55,
    min_length=3,
    max_length=8,
    batch_size=4,
)

DIMS = {"paper": PAPER, "tiny": TINY}


def conversation_lengths(dims: Dims, seed: int = 0) -> np.ndarray:
    """Utterances per conversation, IEMOCAP-like: right-skewed in [min, max], summing to the total.

    IEMOCAP's 6-class training dialogues have roughly 24-110 utterances, mean ≈ 52: a log-normal
    draw clipped to the range, then nudged one utterance at a time until the total is exact.
    """
    rng = np.random.default_rng(seed)
    mean = dims.total_utterances / dims.num_conversations
    raw = rng.lognormal(np.log(mean) - 0.08, 0.4, dims.num_conversations)
    lengths = np.clip(np.round(raw), dims.min_length, dims.max_length).astype(np.int64)
    while lengths.sum() != dims.total_utterances:
        step = 1 if lengths.sum() < dims.total_utterances else -1
        room = (lengths < dims.max_length) if step > 0 else (lengths > dims.min_length)
        lengths[rng.choice(np.flatnonzero(room))] += step
    return lengths


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Synthetic utterance embeddings in conversation order (one row per utterance)."""

    speech: np.ndarray  # float32 [N, Ds]
    text: np.ndarray  # float32 [N, Dt]
    labels: np.ndarray  # int32 [N]
    lengths: np.ndarray  # int64 [num_conversations]
    starts: np.ndarray  # int64 [num_conversations]


def make_corpus(dims: Dims, seed: int = 0) -> Corpus:
    """IEMOCAP-shaped training split: lengths from `conversation_lengths`, Gaussian features."""
    lengths = conversation_lengths(dims, seed)
    rng = np.random.default_rng(seed + 1)
    n = int(lengths.sum())
    speech = rng.standard_normal((n, dims.speech_dim), dtype=np.float32)
    text = rng.standard_normal((n, dims.text_dim), dtype=np.float32)
    labels = rng.integers(0, dims.num_classes, n).astype(np.int32)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return Corpus(speech, text, labels, lengths, starts)


def authors_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """The authors' batching: conversations shuffled, cut into batches, each padded to its longest."""
    order = rng.permutation(len(lengths))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def pad_batch(corpus: Corpus, conversations: np.ndarray, width: int | None = None):
    """Stack conversations into zero-padded arrays [B, T, D] and a mask [B, T]; T = width or the max."""
    lens = corpus.lengths[conversations]
    t = int(lens.max()) if width is None else width
    b = len(conversations)
    speech = np.zeros((b, t, corpus.speech.shape[1]), np.float32)
    text = np.zeros((b, t, corpus.text.shape[1]), np.float32)
    labels = np.zeros((b, t), np.int32)
    mask = np.zeros((b, t), bool)
    for row, (c, n) in enumerate(zip(conversations, lens)):
        s = corpus.starts[c]
        speech[row, :n] = corpus.speech[s : s + n]
        text[row, :n] = corpus.text[s : s + n]
        labels[row, :n] = corpus.labels[s : s + n]
        mask[row, :n] = True
    return speech, text, labels, mask


def padded_utterances(batches: list[np.ndarray], lengths: np.ndarray, widths=None, batch_size=None) -> int:
    """Padded utterance slots an epoch computes on (rows × width summed over batches).

    widths: per-batch padded length (default: each batch's longest conversation). batch_size: rows per
    batch when short batches are padded to full size with empty conversations (default: as they are).
    """
    total = 0
    for i, batch in enumerate(batches):
        width = int(lengths[batch].max()) if widths is None else int(widths[i])
        rows = len(batch) if batch_size is None else batch_size
        total += rows * width
    return total


def peak_rss_mib() -> float:
    """Peak resident set size of this process in MiB (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (or platform.processor() elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    """The SIMD flags of interest (avx2, avx512f, fma) present in /proc/cpuinfo."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]


def machine_info() -> dict:
    """nproc, CPU model, SIMD flags and library versions, for the results file."""
    info = {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "python": sys.version.split()[0],
    }
    for name in ("numpy", "jax", "jaxlib", "flax", "optax", "torch", "transformers"):
        try:
            module = __import__(name)
            info[name] = getattr(module, "__version__", "?")
        except ImportError:
            info[name] = None
    return info


def emit(record: dict) -> None:
    """Print one worker's result as a single JSON line tagged for the parent process."""
    print("RESULT " + json.dumps(record), flush=True)


def parse_result(stdout: str) -> dict:
    """The JSON record a worker printed with `emit` (the last one)."""
    lines = [l for l in stdout.splitlines() if l.startswith("RESULT ")]
    if not lines:
        raise RuntimeError("benchmark worker printed no RESULT line; its output:\n" + stdout[-2000:])
    return json.loads(lines[-1][len("RESULT ") :])


def write_result(result: dict, out: str | os.PathLike) -> None:
    """Writes a benchmark's result as JSON to `out` and says where."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
