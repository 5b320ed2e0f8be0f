"""What the tests share: the tiny model and the tiny demo store every training test uses, the compile
cache, and the helpers that spell a training command line.

Runs use the demo generator shrunk to a few short conversations and a tiny model with one pad length,
and the persistent compilation cache, so that a run takes seconds once its programs are cached. Test
files import the constants and helpers (``from conftest import TINY, train_args``); the fixtures need
no import.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bridges.demo import DemoConfig, build_demo_store

# XLA:CPU compiles the tests' small programs several times faster with the classic fusion emitters and
# without LLVM's expensive passes, for the same results (a tiny run with a cold cache: 41 s -> 17 s). Set
# before JAX starts, so that this process and every command a test starts compile so.
FAST_COMPILE_FLAGS = (
    "--xla_cpu_use_fusion_emitters=false",
    "--xla_backend_optimization_level=0",
    "--xla_llvm_disable_expensive_passes=true",
)
_given = os.environ.get("XLA_FLAGS", "").split()  # a flag given in the environment keeps its value
os.environ["XLA_FLAGS"] = " ".join(
    _given + [f for f in FAST_COMPILE_FLAGS if f.split("=")[0] not in {g.split("=")[0] for g in _given}]
)

REPO = Path(__file__).resolve().parents[1]
CACHE = os.environ.get("MISTER_JAX_CACHE", str(Path.home() / ".cache" / "mister" / "jax"))
TINY = [
    "can_hidden=8",
    "fusion_dim=8",
    "attention_dim=8",
    "attention_heads=2",
    "gru_layers=1",
    "fusion_layers=1",
    "num_buckets=1",
    "batch_size=4",
    "learning_rate=0.01",
]
TINY_DEMO = DemoConfig(
    conversations=(("train", 8), ("val", 4), ("test", 4)), min_length=3, max_length=6, text_dim=6, speech_dim=5
)


def tiny_store(root: Path, config: DemoConfig = TINY_DEMO) -> Path:
    """Builds the demo store of ``config`` under the store root ``root`` (``root/demo``); returns its folder."""
    return build_demo_store(root, config=config)


def set_flags(overrides) -> list[str]:
    """``--set`` flags for each ``key=value`` of ``overrides``."""
    return [a for item in overrides for a in ("--set", item)]


def train_args(
    features: Path, out: Path, epochs: int, *extra: str, seeds: int = 2, dataset: str = "demo", settings=TINY
) -> list[str]:
    """The arguments of ``python -m mister_jax.train`` for the tiny model on the store root ``features``;
    the state is checkpointed after every epoch."""
    return [
        "--dataset",
        dataset,
        "--features",
        str(features),
        "--out",
        str(out),
        "--epochs",
        str(epochs),
        "--seeds",
        str(seeds),
        "--checkpoint-every",
        "1",
        "--quiet",
        "--jax-cache",
        CACHE,
        *extra,
        *set_flags(settings),
    ]


def tiny_config(epochs: int, *overrides: str, seeds: int = 2):
    """The `mister_jax.config.Config` that `train_args` gives the command line (the demo preset, `TINY`,
    a checkpoint after every epoch), with ``overrides`` last."""
    from mister_jax.configs import get_config
    from mister_jax.configs.overrides import apply_overrides

    return apply_overrides(
        get_config("demo"), [*TINY, f"epochs={epochs}", f"seeds={seeds}", "checkpoint_every=1", *overrides]
    )


def cli(args: list[str], module: str = "mister_jax.train") -> list[str]:
    """The command that runs ``python -m module args`` in a fresh interpreter."""
    return [sys.executable, "-m", module, *args]


def run_benchmark(script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs ``benchmarks/SCRIPT ARGS`` from the repository root (with this process's fast-compile XLA
    flags: the smoke runs check plumbing, not speed) and returns it, asserting that it succeeded."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="session")
def compile_cache() -> Path | None:
    """The persistent compilation cache enabled in this process (what ``--jax-cache`` does)."""
    from mister_jax.runtime.compile_cache import enable_compilation_cache

    return enable_compilation_cache(CACHE)


@pytest.fixture(scope="session")
def tiny_features(tmp_path_factory) -> Path:
    """A store root holding the `TINY_DEMO` store (``demo/``), built once per session; tests only read it."""
    root = tmp_path_factory.mktemp("tiny-features")
    tiny_store(root)
    return root
