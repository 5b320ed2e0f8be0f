"""Orbax checkpoints of a training run: periodic training state and the best parameters per seed.

Layout under ``<run>/checkpoints``::

    state/<epoch>/     {"state": training state of every seed, "meta": JSON (history, best records)}
    best/seed_<s>/<epoch>/  {"params": best-validation parameters of seed s}

Orbax commits a step by renaming a finished temporary directory, so a run killed mid-save leaves
the previous step intact. Anything unreadable raises ``CheckpointError`` with a one-line message
naming the directory and the fix.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import serialization

# Orbax logs a failed background write with its traceback before raising it; `CheckpointError`
# reports it in one line instead.
logging.getLogger("absl").setLevel(logging.CRITICAL)


class CheckpointError(Exception):
    """A checkpoint directory that cannot be read or written."""


@contextlib.contextmanager
def interrupts_deferred():
    """Lets checkpoint writes finish before a Ctrl-C takes effect (then raises KeyboardInterrupt)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending = []
    previous = signal.signal(signal.SIGINT, lambda *_: pending.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pending:
        raise KeyboardInterrupt


def _unreadable(path: Path, err: Exception) -> CheckpointError:
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    return CheckpointError(f"{path}: checkpoint is unreadable ({type(err).__name__}: {first}) — "
                           f"delete that directory or rerun with --restart")


def _manager(path: Path, keep: int, background: bool = False, item_handlers=None) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=background)
    try:
        return ocp.CheckpointManager(path, options=options, item_handlers=item_handlers)
    except Exception as err:  # orbax raises many types on a damaged directory
        raise _unreadable(path, err) from None


def _host_state_handler() -> ocp.PyTreeCheckpointHandler:
    """Writes a pytree of host NumPy arrays in the background straight from the caller's buffers.

    Orbax's defaults would first deep-copy every array (4.5 GB of fresh memory per paper-dims
    checkpoint: ~13 s of page faults on a 2-core VM) and compress it with zstd (~12 % less disk for
    ~8 s of CPU taken from training); the caller instead promises not to touch the arrays until
    `RunCheckpoints.wait` returns (docs/BENCHMARKS.md)."""
    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
        (np.number, ocp.type_handlers.ScalarHandler()), (int, ocp.type_handlers.ScalarHandler()),
        (float, ocp.type_handlers.ScalarHandler()))
    return ocp.PyTreeCheckpointHandler(use_compression=False, type_handler_registry=registry)


def _unwritable(path: Path, err: Exception) -> CheckpointError:
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
    return CheckpointError(f"{path}: writing a checkpoint failed ({type(err).__name__}: {first}) — free disk "
                           f"space or fix the directory's permissions, then rerun the same command to resume "
                           f"from the last complete checkpoint")


@contextlib.contextmanager
def _writing(path: Path):
    """Turns any failure of a (background) checkpoint write into one `CheckpointError`."""
    try:
        yield
    except Exception as err:  # orbax and tensorstore raise many types (OSError, ValueError, ...)
        raise _unwritable(path, err) from None


def _abstract(tree: Any) -> Any:
    return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, serialization.to_state_dict(tree))


class RunCheckpoints:
    """Checkpoints of one run directory (``root = <run>/checkpoints``)."""

    def __init__(self, root: Path, keep: int = 2):
        self.root = Path(root).absolute()
        self._state = _manager(self.root / "state", keep, background=True,
                               item_handlers={"state": _host_state_handler(), "meta": ocp.JsonCheckpointHandler()})
        self._best: dict[int, ocp.CheckpointManager] = {}

    def latest_epoch(self) -> int | None:
        """The last committed epoch of the training state, or ``None``."""
        return self._state.latest_step()

    def wait(self) -> None:
        """Returns when the training state being written in the background is on disk."""
        with interrupts_deferred(), _writing(self.root / "state"):
            self._state.wait_until_finished()

    def save_state(self, epoch: int, state: Any, meta: dict) -> None:
        """Saves ``state`` (a flax-serialisable pytree of host NumPy arrays) and JSON ``meta`` as step
        ``epoch``.

        Returns at once; the files are written in the background from ``state``'s own arrays, so the
        caller must not modify them before `wait` returns. Each step is committed atomically
        (``close`` waits for the last one)."""
        with interrupts_deferred(), _writing(self.root / "state"):
            self._state.wait_until_finished()
            self._state.save(epoch, args=ocp.args.Composite(
                state=ocp.args.PyTreeSave(serialization.to_state_dict(state)),
                meta=ocp.args.JsonSave(meta)), force=True)

    def restore_state(self, target: Any) -> tuple[int, Any, dict]:
        """``(epoch, state, meta)`` of the latest step; ``target`` (host NumPy arrays) gives the pytree
        structure, shapes and dtypes."""
        epoch = self.latest_epoch()
        path = self.root / "state" / str(epoch)
        item = serialization.to_state_dict(target)
        try:
            restored = self._state.restore(epoch, args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(item, restore_args=ocp.checkpoint_utils.construct_restore_args(item)),
                meta=ocp.args.JsonRestore()))
            state = serialization.from_state_dict(target, restored["state"])
        except Exception as err:
            raise _unreadable(path, err) from None
        return epoch, state, dict(restored["meta"])

    def _best_manager(self, seed: int) -> ocp.CheckpointManager:
        if seed not in self._best:
            self._best[seed] = _manager(self.root / "best" / f"seed_{seed}", keep=1)
        return self._best[seed]

    def save_best(self, seed: int, epoch: int, params: Any) -> None:
        """Keeps ``params`` as the best parameters of ``seed`` (found at ``epoch``; already kept when a
        finished run is extended with more epochs and its best epoch stays the same)."""
        manager = self._best_manager(seed)
        if epoch in manager.all_steps():
            return
        with interrupts_deferred(), _writing(self.root / "best" / f"seed_{seed}"):
            manager.save(epoch, args=ocp.args.Composite(
                params=ocp.args.StandardSave(serialization.to_state_dict(params))), force=True)
            manager.wait_until_finished()

    def restore_best(self, seed: int, target: Any) -> tuple[int, Any]:
        """``(epoch, params)`` of the best parameters of ``seed``."""
        manager = self._best_manager(seed)
        epoch = manager.latest_step()
        path = self.root / "best" / f"seed_{seed}"
        if epoch is None:
            raise CheckpointError(f"{path}: no best parameters saved — train the run to the end first")
        try:
            restored = manager.restore(epoch, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(_abstract(target))))
            params = serialization.from_state_dict(target, restored["params"])
        except Exception as err:
            raise _unreadable(path / str(epoch), err) from None
        return epoch, params

    def close(self) -> None:
        """Waits for pending writes and releases the managers."""
        with interrupts_deferred(), _writing(self.root / "state"):
            self._state.wait_until_finished()
            self._state.close()
            for manager in self._best.values():
                manager.close()
