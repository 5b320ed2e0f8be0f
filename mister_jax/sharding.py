"""The devices a run trains on: a `jax.sharding.Mesh` with axes ("seed", "batch") and where the seeds'
arrays live on it (`SeedMesh`); the processes of a multi-host run (`initialize_distributed`).

The rule, for ``n`` devices, ``K`` seeds and batches of ``B`` conversations: the seed axis gets
``gcd(K, n)`` devices and the batch axis the other factor, ``n / gcd(K, n)``, which must divide ``B``.
So 4 seeds on 2 devices put two seeds on each device; 2 seeds on 4 devices give each seed two devices,
each holding half of every batch; 3 seeds on 2 devices step all three seeds on each device, each on
half of every batch. Seeds are never padded: a device count that leaves a batch axis not dividing
``B`` is refused (`SeedMesh.create` lists the counts that work).

On a CPU split into devices (``--xla_force_host_platform_device_count``) the batch axis stays 1, so
``n`` must divide ``K``: splitting a batch needs collectives between the devices, and XLA:CPU runs
the devices' shares of a program on one thread pool where their collectives can wait for each other
in different orders and hang. Split seeds need no collective at all.

Every array of the vmapped step has a leading seed axis ``[K, ...]``: the parameters, Adam's state,
the step counter and the dropout keys are split along it (``PartitionSpec("seed")``), the training
batches ``[K, B, T, ·]`` along both axes, the evaluation batches ``[B, T, ·]`` (shared by every seed)
along "batch". The step's metrics and the predictions come back split along the seed axis and are
read whole on the host (`SeedMesh.fetch`). The partitioned program computes the same function as the
one-device program (JAX's partitionable Threefry draws the same dropout bits however the arrays are
split); only float rounding differs, since XLA compiles each device's share for its own shapes and a
split batch is summed across devices.

A multi-host run starts one process per host (`initialize_distributed`); the mesh spans the first
``n`` devices of every process, batch axis innermost so that a batch's shards stay on one host where
they can. Each process reads the whole store and builds the same global batches (plans are pure
functions of seed and epoch); it hands over only the shards of its own devices
(`jax.make_array_from_callback`). Only process 0 writes (`SeedMesh.primary`); decisions taken from its
clock are shared with `SeedMesh.agree`. See docs/MULTI_HOST.md.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mister_jax.errors import UsageError

AXES = ("seed", "batch")


def mesh_shape(num_devices: int, num_seeds: int, batch_size: int, split_batches: bool = True) -> tuple[int, int] | None:
    """``(seed, batch)`` axis sizes of the rule above, or None when the batch axis does not divide ``B``
    (or, without ``split_batches``, is not 1)."""
    seed = math.gcd(num_devices, num_seeds)
    batch = num_devices // seed
    return (seed, batch) if batch_size % batch == 0 and (split_batches or batch == 1) else None


def primary_process() -> bool:
    """Whether this process writes the run's files: process 0 (the only one of a one-host run)."""
    return jax.process_index() == 0


def check_devices(devices: int | None) -> None:
    """Refuses a ``--devices`` this process cannot give (`UsageError`), before anything is written."""
    local = jax.local_devices()
    if devices is not None and devices < 1:
        raise UsageError(f"--devices {devices}: must be >= 1")
    if devices is not None and devices > len(local):
        raise UsageError(
            f"--devices {devices}: this process has {len(local)} {local[0].platform} device(s) — pass "
            f"--devices {len(local)} or fewer (on a CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N "
            f"makes N devices)"
        )


def initialize_distributed(coordinator: str | None, num_processes: int | None, process_id: int | None) -> None:
    """Joins a multi-host run with `jax.distributed.initialize` when any of the three is given (the rest
    come from the environment JAX reads, e.g. a SLURM or Cloud TPU job); must run before anything
    touches a device. One process (none given) does nothing."""
    if coordinator is None and num_processes is None and process_id is None:
        return
    if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
        raise UsageError(
            f"--process-id {process_id}: must be in 0..{num_processes - 1} (--num-processes {num_processes})"
        )
    try:
        jax.distributed.initialize(coordinator, num_processes, process_id)
    except (RuntimeError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise UsageError(
            f"--coordinator-address {coordinator}: joining the run failed ({first}) — start every process "
            f"with the same --coordinator-address HOST:PORT and --num-processes, each with its own --process-id"
        ) from None


@dataclasses.dataclass(frozen=True)
class SeedMesh:
    """The run's devices as a mesh ``[seed, batch]`` and the shardings of the seeds' arrays on it.

    With one device (``sharded`` False) arrays go where JAX puts them by default, as before any mesh.
    """

    mesh: Mesh

    @classmethod
    def create(cls, devices: int | None, num_seeds: int, batch_size: int, log=None) -> "SeedMesh":
        """The mesh of ``devices`` devices per process (None: every local device, or the most of them
        that the rule allows, said through ``log``).

        Raises:
          UsageError: more devices than the process has, or a count the rule refuses.
        """
        check_devices(devices)
        local = jax.local_devices()
        processes = jax.process_count()
        split = local[0].platform != "cpu"
        usable = [n for n in range(1, len(local) + 1) if mesh_shape(n * processes, num_seeds, batch_size, split)]
        if not usable:
            raise UsageError(
                f"{processes} process(es) × any device count leave a batch axis that batch size {batch_size} "
                f"does not divide with {num_seeds} seed(s) — change --seeds or batch_size, or the process count"
            )
        if devices is not None and devices not in usable:
            total = devices * processes
            problem = (
                f"which batch size {batch_size} does not divide"
                if split
                else "but a CPU's devices split the seeds only (mister_jax.sharding)"
            )
            raise UsageError(
                f"--devices {devices}: {num_seeds} seed(s) on {total} device(s) leave a batch axis of "
                f"{total // math.gcd(total, num_seeds)}, {problem} — choose --devices among "
                f"{', '.join(map(str, usable))}, or another --seeds or batch_size"
            )
        count = devices or usable[-1]
        if devices is None and count < len(local) and log is not None:
            log(f"using {count} of {len(local)} devices: the others would not split {num_seeds} seed(s) evenly")
        chosen = [d for p in range(processes) for d in sorted(jax.local_devices(p), key=lambda d: d.id)[:count]]
        shape = mesh_shape(count * processes, num_seeds, batch_size, split)
        return cls(Mesh(np.array(chosen, dtype=object).reshape(shape), AXES))

    @property
    def shape(self) -> dict[str, int]:
        """``{"seed": s, "batch": b}``."""
        return dict(self.mesh.shape)

    @property
    def sharded(self) -> bool:
        """Whether the run spans more than one device."""
        return self.mesh.size > 1

    @property
    def primary(self) -> bool:
        """Whether this process writes the run's files (`primary_process`)."""
        return primary_process()

    def describe(self) -> dict:
        """What results.json records of the devices (a run option, not part of the configuration)."""
        return {"devices": self.mesh.size, "mesh": self.shape, "processes": jax.process_count()}

    def _sharding(self, *axes: str) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec(*axes))

    @property
    def seeds(self) -> NamedSharding:
        """Arrays ``[K, ...]``: the training states, the parameters and the dropout keys."""
        return self._sharding("seed")

    @property
    def train_batch(self) -> NamedSharding:
        """Training batches ``[K, B, T, ·]``."""
        return self._sharding("seed", "batch")

    @property
    def eval_batch(self) -> NamedSharding:
        """Evaluation batches ``[B, T, ·]``, the same for every seed."""
        return self._sharding("batch")

    def put(self, tree: Any, sharding: NamedSharding) -> Any:
        """``tree`` (host or device arrays, typed PRNG keys included) placed with ``sharding``; on several
        processes each one supplies the shards of its own devices from its copy of the whole array."""
        if jax.process_count() == 1:
            return jax.device_put(tree, sharding)

        def place(x):
            if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
                return jax.random.wrap_key_data(place(jax.random.key_data(x)), impl=jax.random.key_impl(x))
            x = np.asarray(x)
            return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

        return jax.tree_util.tree_map(place, tree)

    def fetch(self, tree: Any) -> Any:
        """``tree``'s arrays whole on the host (on several processes: gathered from all of them, which
        every process must call together)."""
        if jax.process_count() == 1:
            return jax.device_get(tree)
        return multihost_utils.process_allgather(tree, tiled=True)

    def sync(self, name: str) -> None:
        """Waits until every process has got here (e.g. process 0 has removed what ``--restart`` discards
        before any process reads the checkpoints)."""
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(name)

    def agree(self, flag: bool) -> bool:
        """Process 0's ``flag`` on every process (for decisions taken from a clock)."""
        if jax.process_count() == 1:
            return flag
        return bool(multihost_utils.broadcast_one_to_all(np.bool_(flag)))
