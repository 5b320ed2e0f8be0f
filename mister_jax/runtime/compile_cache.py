"""Ahead-of-time compiled training steps: one executable per batch shape, and a disk cache of the
traced programs so that a warm start neither traces nor compiles.

Tracing the MiSTER-E train step (flax, autodiff, optax) is slow in Python, and XLA's persistent
compilation cache (`enable_compilation_cache`) only skips the compile that follows. `TrainStepCompiler`
keeps each traced and lowered step, serialized with `jax.export`, next to XLA's cache, under a key made
of the source of the `mister_jax` package (every module, subpackages included), the versions of jax,
jaxlib, flax and optax, the step's configuration and the argument shapes. A warm start deserializes it
and compiles from XLA's cache (docs/BENCHMARKS.md, "traced steps cached on disk").

    compiler = TrainStepCompiler(train, key=repr(configs), cache_dir=path)   # train: jitted step
    compiler.compile(abstract_state, batch, dropout_key)   # ahead of time, from shapes only
    state, metrics = compiler(state, batch, dropout_key)   # dispatches on the batch's shape

The executable takes the state's leaves and donates them, as the jitted step does. Given
``shardings`` (a `StepShardings`), the program is partitioned over their mesh: exported with them, so
the cached program is the partitioned one (keyed by the mesh's shape), and compiled to take and give
its arrays so placed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from mister_jax import atomic
from mister_jax.runtime.memory import release_free_heap

DEFAULT_CACHE = Path.home() / ".cache" / "mister" / "jax"

_PACKAGE_DIR = Path(__file__).resolve().parent.parent  # mister_jax/
_VERSIONED = ("jax", "jaxlib", "flax", "optax")


def enable_compilation_cache(path: str) -> Path | None:
    """Persists compiled XLA programs under ``path`` so a second run does not compile again; returns
    the directory, or None when it cannot be created (then nothing is cached)."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return Path(path)


def _source_digest(package_dir: Path = _PACKAGE_DIR) -> str:
    """SHA-256 over every module of the package, subpackages included (by sorted relative path), and
    the versions that shape the traced program: an edit anywhere in it invalidates the cache."""
    digest = hashlib.sha256()
    for path in sorted(package_dir.rglob("*.py"), key=lambda p: p.relative_to(package_dir).as_posix()):
        digest.update(path.relative_to(package_dir).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    for name in _VERSIONED:
        digest.update(f"{name}={importlib.metadata.version(name)}".encode())
    return digest.hexdigest()


def _abstract(x: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype)


@dataclasses.dataclass(frozen=True)
class StepShardings:
    """Where the step's arrays live (`jax.sharding.NamedSharding`s, one per group, for every leaf of it):
    ``state`` in and out, ``batch``, ``key`` (the dropout keys' data) and the ``metrics`` returned."""

    state: Any
    batch: Any
    key: Any
    metrics: Any


class TrainStepCompiler:
    """Compiled executables of ``step(state, batch, dropout_key) -> (state, metrics)`` per input shape.

    Args:
        step: the (jitted or plain) step function; ``metrics`` must be a dict of arrays.
        key: what, besides the source and versions, determines the program (e.g. the configurations).
        cache_dir: where the exported programs are kept; None keeps nothing on disk.
        compiler_options: XLA options for compiling the executables (None: XLA's defaults).
        shardings: where the arrays live on a mesh (`StepShardings`); None: the default device.
    """

    def __init__(
        self,
        step: Callable,
        key: str,
        cache_dir: str | Path | None,
        compiler_options: dict | None = None,
        shardings: StepShardings | None = None,
    ):
        self._step = step
        self._compiler_options = compiler_options
        self._shardings = shardings
        mesh = None if shardings is None else dict(shardings.state.mesh.shape)
        self._key = hashlib.sha256((_source_digest() + key + repr(mesh)).encode()).hexdigest()
        self._cache_dir = Path(cache_dir) / "exported" if cache_dir else None
        self._executables: dict[tuple, tuple[Any, Any]] = {}  # signature -> (executable, state treedef)

    def _signature(self, state, batch, dropout_key) -> tuple:
        leaves = jax.tree_util.tree_leaves((state, batch, dropout_key))
        return tuple((tuple(np.shape(x)), str(x.dtype)) for x in leaves)

    def compile(self, state, batch, dropout_key) -> None:
        """Compiles for the shapes of the arguments (arrays or ``jax.ShapeDtypeStruct``s) unless done."""
        signature = self._signature(state, batch, dropout_key)
        if signature in self._executables:
            return
        state_leaves, state_def = jax.tree_util.tree_flatten(state)
        batch_leaves, batch_def = jax.tree_util.tree_flatten(batch)
        key_impl = jax.random.key_impl(dropout_key)
        key_data = _abstract(jax.eval_shape(jax.random.key_data, dropout_key))

        def flat_step(state_leaves, batch_leaves, key_data):
            new_state, metrics = self._step(
                jax.tree_util.tree_unflatten(state_def, state_leaves),
                jax.tree_util.tree_unflatten(batch_def, batch_leaves),
                jax.random.wrap_key_data(key_data, impl=key_impl),
            )
            return jax.tree_util.tree_leaves(new_state), metrics

        args = ([_abstract(x) for x in state_leaves], [_abstract(x) for x in batch_leaves], key_data)
        placed = {}
        if self._shardings is not None:
            s = self._shardings
            state_in = [s.state] * len(state_leaves)
            placed = dict(
                in_shardings=(state_in, [s.batch] * len(batch_leaves), s.key), out_shardings=(state_in, s.metrics)
            )
        exported = self._load_or_export(jax.jit(flat_step, **placed), args, signature)
        executable = jax.jit(exported.call, donate_argnums=0, **placed).lower(*args).compile(self._compiler_options)
        self._executables[signature] = (executable, state_def)
        release_free_heap()

    def _load_or_export(self, jitted_step: Callable, args: tuple, signature: tuple):
        path = None
        if self._cache_dir is not None:
            platform = jax.devices()[0].platform
            name = hashlib.sha256((self._key + repr(signature) + repr(platform)).encode()).hexdigest()
            path = self._cache_dir / f"{name}.jax_exported"
            exported = _read_exported(path)
            if exported is not None:
                return exported
        exported = jax.export.export(jitted_step)(*args)
        if path is not None:
            payload = exported.serialize()
            _write_exported(path, hashlib.sha256(payload).digest() + payload)
        return exported

    def __call__(self, state, batch, dropout_key):
        """One step; compiles first if this shape is new."""
        signature = self._signature(state, batch, dropout_key)
        if signature not in self._executables:
            self.compile(state, batch, dropout_key)
        executable, state_def = self._executables[signature]
        new_leaves, metrics = executable(
            jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(batch), jax.random.key_data(dropout_key)
        )
        return jax.tree_util.tree_unflatten(state_def, new_leaves), metrics

    @property
    def num_shapes(self) -> int:
        return len(self._executables)


def _read_exported(path: Path):
    """The program cached at ``path`` (a SHA-256 of the payload, then the payload), or None when it is
    absent or does not check out; the caller then traces again and rewrites it."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    digest, payload = data[:32], data[32:]
    if hashlib.sha256(payload).digest() != digest:
        return None
    return jax.export.deserialize(bytearray(payload))


def _write_exported(path: Path, data: bytes) -> None:
    """Caches a program; not synced (a lost one is traced again), and a cache that cannot be written
    only costs the next start its tracing."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_bytes(path, data, durable=False)
    except OSError:
        pass
