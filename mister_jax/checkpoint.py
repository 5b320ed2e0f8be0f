"""Checkpoints of a training run: periodic training state and the best parameters per seed.

Layout under ``<run>/checkpoints``::

    state/<epoch>/          the training state of every seed and the best parameters so far:
        train.bin, best_params.bin   the host mirrors' buffers (`mister_jax.runtime.host_mirror`) as they are
        index.json                   each buffer's layout (leaf paths, dtypes, shapes, byte offsets)
        meta.json                    JSON (history, best records)
        digests.json                 the SHA-256 of each file above, written last
    best/seed_<s>/<epoch>/  {"params": best-validation parameters of seed s} (orbax, read by predict)
    best/seed_<s>.digest.json        {"epoch", "sha256"} of those parameters (paths, dtypes, shapes, bytes)

Every step proves its integrity: restoring verifies each file against its digest, and a step that
fails is reported in one line and passed over for the previous one (two are kept); with none intact,
or best parameters that fail theirs, `CheckpointError` names the directory and the fix.

A state step is written in the background into ``state/<epoch>.partial`` and committed by renaming
it, so a run killed mid-save leaves the previous step intact; the last two steps are kept. How the
buffers reach the disk (direct I/O, past the page cache) is `mister_jax.runtime.direct_io`'s business.

Of several processes (a multi-host run) every one reads the checkpoints, which must be on a filesystem
they share; only process 0 writes the state steps and the digests, and orbax, which every process
calls together, writes the best parameters from it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import sys
import threading
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import serialization

from mister_jax import atomic
from mister_jax.atomic import interrupts_deferred
from mister_jax.runtime import direct_io


class CheckpointError(Exception):
    """A checkpoint directory that cannot be read or written."""


def _reason(err: Exception) -> str:
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    return f"checkpoint is unreadable ({type(err).__name__}: {first})"


def _unreadable(
    path: Path, err: Exception, fix: str = "delete that directory or rerun with --restart"
) -> CheckpointError:
    return CheckpointError(f"{path}: {_reason(err)} — {fix}")


def _manager(path: Path, keep: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
    try:
        return ocp.CheckpointManager(path, options=options)
    except Exception as err:  # orbax raises many types on a damaged directory
        raise _unreadable(path, err) from None


def _unwritable(path: Path, err: Exception) -> CheckpointError:
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
    return CheckpointError(
        f"{path}: writing a checkpoint failed ({type(err).__name__}: {first}) — free disk "
        f"space or fix the directory's permissions, then rerun the same command to resume "
        f"from the last complete checkpoint"
    )


@contextlib.contextmanager
def _writing(path: Path):
    """Turns any failure of a (background) checkpoint write into one `CheckpointError`; orbax's own log
    of the failure (its traceback, through absl) is held back meanwhile."""
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.CRITICAL)
    try:
        yield
    except Exception as err:  # OSError from the state writer; orbax and tensorstore raise many types
        raise _unwritable(path, err) from None
    finally:
        absl.setLevel(level)


def _sha256(data) -> str:
    return hashlib.sha256(memoryview(data).cast("B")).hexdigest()


def _write_json(path: Path, obj: Any) -> str:
    """Writes ``obj`` as JSON to ``path`` (atomically, synced); returns the SHA-256 of the bytes written."""
    data = json.dumps(obj).encode("utf-8")
    atomic.write_bytes(path, data)
    return _sha256(data)


def params_digest(params: Any) -> str:
    """SHA-256 over the leaves of a parameter tree: each leaf's path, dtype, shape and bytes, in order."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(serialization.to_state_dict(params))[0]:
        array = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}|{array.dtype.str}|{array.shape}".encode())
        digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


def _abstract(tree: Any) -> Any:
    return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, serialization.to_state_dict(tree))


class RunCheckpoints:
    """Checkpoints of one run directory (``root = <run>/checkpoints``); keeps the last ``keep`` states.

    ``log`` receives the one-line report of a step that fails verification (default: stderr);
    ``primary`` (default: whether this is process 0) says whether this process writes."""

    def __init__(self, root: Path, keep: int = 2, log=None, primary: bool | None = None):
        self.root = Path(root).absolute()
        self._primary = jax.process_index() == 0 if primary is None else primary
        self._log = log or (lambda message: print(message, file=sys.stderr, flush=True))
        self._state_dir = self.root / "state"
        self._keep = keep
        self._writer: threading.Thread | None = None
        self._write_error: Exception | None = None
        self._best: dict[int, ocp.CheckpointManager] = {}

    def latest_epoch(self) -> int | None:
        """The last committed epoch of the training state, or ``None``."""
        steps = self._committed()
        return steps[-1] if steps else None

    def _committed(self) -> list[int]:
        if not self._state_dir.is_dir():
            return []
        return sorted(int(p.name) for p in self._state_dir.iterdir() if p.name.isdigit() and p.is_dir())

    def wait(self) -> None:
        """Returns when the training state being written in the background is on disk."""
        with interrupts_deferred(), _writing(self._state_dir):
            if self._writer is not None:
                self._writer.join()
                self._writer = None
            error, self._write_error = self._write_error, None
            if error is not None:
                raise error

    def save_state(self, epoch: int, mirrors: dict, meta: dict) -> None:
        """Saves the buffers of ``mirrors`` (name → `HostMirror`) and JSON ``meta`` as step ``epoch``.

        Returns at once; the buffers are written in the background as they are, so the caller must
        not modify them before `wait` returns. Each step is committed atomically (``close`` waits for
        the last one). Only the primary process writes."""
        self.wait()
        if not self._primary:
            return
        self._writer = threading.Thread(
            target=self._write_state, args=(epoch, dict(mirrors), meta), name="checkpoint-writer"
        )
        self._writer.start()

    def _write_state(self, epoch: int, mirrors: dict, meta: dict) -> None:
        try:
            partial, final = self._state_dir / f"{epoch}.partial", self._state_dir / str(epoch)
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            digests = {}
            for name, mirror in mirrors.items():
                digests[f"{name}.bin"] = _sha256(mirror.buffer)
                direct_io.write_buffer(partial / f"{name}.bin", mirror.buffer)
            digests["index.json"] = _write_json(
                partial / "index.json", {name: mirror.layout for name, mirror in mirrors.items()}
            )
            digests["meta.json"] = _write_json(partial / "meta.json", meta)
            _write_json(partial / "digests.json", digests)
            shutil.rmtree(final, ignore_errors=True)
            partial.rename(final)
            direct_io.sync_directory(self._state_dir)
            for old in self._committed()[: -self._keep]:
                shutil.rmtree(self._state_dir / str(old), ignore_errors=True)
        except Exception as err:  # reported by the next `wait`
            self._write_error = err

    def restore_state(self, mirrors: dict) -> tuple[int, dict]:
        """Fills the buffers of ``mirrors`` (name → `HostMirror`) from the latest intact step; returns
        ``(epoch, meta)``. The step must have been written for the same pytrees (layouts).

        A step whose files fail their digests, or that cannot be read, is reported through ``log`` and
        the previous one is tried; `CheckpointError` when none is intact."""
        steps = self._committed()
        failures = []
        for epoch in reversed(steps):
            path = self._state_dir / str(epoch)
            try:
                return epoch, self._read_step(path, mirrors)
            except Exception as err:
                failures.append((path, err))
                older = [e for e in steps if e < epoch]
                if older:
                    self._log(
                        f"{path}: {_reason(err)}; resuming from the previous checkpoint (epoch {older[-1]}) instead"
                    )
        if len(failures) == 1:
            raise _unreadable(*failures[0])
        raise CheckpointError(
            f"{self._state_dir}: no intact checkpoint (epochs {', '.join(map(str, steps))}; "
            f"newest: {_reason(failures[0][1])}) — rerun with --restart to train from scratch"
        )

    def _read_step(self, path: Path, mirrors: dict) -> dict:
        digests = json.loads((path / "digests.json").read_text(encoding="utf-8"))
        files = {name: (path / name).read_bytes() for name in ("index.json", "meta.json")}
        for name, data in files.items():
            if _sha256(data) != digests.get(name):
                raise ValueError(f"{name} fails its SHA-256 digest")
        index = json.loads(files["index.json"])
        for name, mirror in mirrors.items():
            if index.get(name) != mirror.layout:
                raise ValueError(f"{name}.bin holds other arrays than this run's model and optimizer")
            direct_io.read_buffer(path / f"{name}.bin", mirror.buffer)
            if _sha256(mirror.buffer) != digests.get(f"{name}.bin"):
                raise ValueError(f"{name}.bin fails its SHA-256 digest (its bytes changed after it was written)")
        return json.loads(files["meta.json"])

    def _best_manager(self, seed: int) -> ocp.CheckpointManager:
        if seed not in self._best:
            self._best[seed] = _manager(self.root / "best" / f"seed_{seed}", keep=1)
        return self._best[seed]

    def _digest_path(self, seed: int) -> Path:
        return self.root / "best" / f"seed_{seed}.digest.json"

    def save_best(self, seed: int, epoch: int, params: Any) -> None:
        """Keeps ``params`` as the best parameters of ``seed`` (found at ``epoch``; already kept when a
        finished run is extended with more epochs and its best epoch stays the same), with their digest."""
        manager = self._best_manager(seed)
        digest = params_digest(params)
        if epoch in manager.all_steps() and self._recorded_digest(seed, epoch) == digest:
            return
        with interrupts_deferred(), _writing(self.root / "best" / f"seed_{seed}"):
            manager.save(
                epoch,
                args=ocp.args.Composite(params=ocp.args.StandardSave(serialization.to_state_dict(params))),
                force=True,
            )
            manager.wait_until_finished()
            if self._primary:
                atomic.write_json(self._digest_path(seed), {"epoch": epoch, "sha256": digest})

    def _recorded_digest(self, seed: int, epoch: int) -> str | None:
        try:
            record = json.loads(self._digest_path(seed).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return record.get("sha256") if record.get("epoch") == epoch else None

    def restore_best(self, seed: int, target: Any) -> tuple[int, Any]:
        """``(epoch, params)`` of the best parameters of ``seed``."""
        manager = self._best_manager(seed)
        epoch = manager.latest_step()
        path = self.root / "best" / f"seed_{seed}"
        if epoch is None:
            raise CheckpointError(f"{path}: no best parameters saved — train the run to the end first")
        try:
            restored = manager.restore(
                epoch, args=ocp.args.Composite(params=ocp.args.StandardRestore(_abstract(target)))
            )
            params = serialization.from_state_dict(target, restored["params"])
        except Exception as err:
            raise _unreadable(
                path / str(epoch),
                err,
                f"delete {path} and rerun the training command, which exports them again from its training checkpoint",
            ) from None
        recorded = self._recorded_digest(seed, epoch)
        if recorded != params_digest(params):
            problem = "have no digest" if recorded is None else "fail their SHA-256 digest"
            raise CheckpointError(
                f"{path / str(epoch)}: the best parameters of seed {seed} {problem} — delete "
                f"{path} and rerun the training command, which exports them again from its "
                f"training checkpoint"
            )
        return epoch, params

    def close(self) -> None:
        """Waits for pending writes and releases the managers."""
        self.wait()
        for manager in self._best.values():
            manager.close()
