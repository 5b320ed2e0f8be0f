"""K seeds of one run trained side by side behind one interface: `SeedStates`.

Every seed follows its own trajectory (its own initial parameters, batches and dropout keys,
`mister_jax.steps`). How they run is the one thing this module decides, and nothing outside it knows:

- ``vmap`` (the default on a GPU or TPU): the states are one pytree with a leading seed axis
  ``[K, ...]`` and one vmapped program steps every seed; step ``i`` of every seed must then have one
  shape (`mister_jax.batching.BatchPlanner.train_epoch` with ``aligned=True``).
- ``sequential`` (the default on a CPU, which has no idle cores for a vmapped program to fill): one state per
  seed, each stepped by the same jitted single-seed program, step ``i`` of every seed before step
  ``i + 1``; each seed keeps its own pad lengths. Holding these states stacked as well would copy every
  seed's slot in and out of the stacked buffers at each step (docs/BENCHMARKS.md, "Seeds").

Both give the same trajectories up to float rounding.

On several devices (`mister_jax.sharding.SeedMesh`) the seeds are vmapped and the stacked arrays split
over the mesh: the seed axis across devices, and the batch axis too when there are more devices than
seeds (the rule is `mister_jax.sharding`'s). The trajectories are those of one device up to float
rounding.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mister_jax.config import LossConfig, ModelConfig, TrainConfig
from mister_jax.errors import UsageError
from mister_jax.input_pipeline import Batch, stack_batches
from mister_jax.runtime.compile_cache import StepShardings, TrainStepCompiler
from mister_jax.sharding import SeedMesh
from mister_jax.steps import (
    abstract_train_state,
    create_train_state,
    make_optimizer,
    predict_step,
    seed_keys,
    train_step,
)

SEED_MODES = ("auto", "vmap", "sequential")


def resolve_seed_mode(mode: str, num_devices: int = 1) -> str:
    """``"vmap"`` or ``"sequential"``; ``"auto"`` vmaps on an accelerator or over several devices, steps
    the seeds in turn on one CPU. Seeds stepped in turn use one device (`UsageError` otherwise)."""
    if mode not in SEED_MODES:
        raise ValueError(f"seed mode {mode!r} is not one of {SEED_MODES}")
    if mode == "sequential" and num_devices > 1:
        raise UsageError(
            f"--seed-mode sequential steps the seeds in turn on one device, not {num_devices} — pass "
            f"--devices 1, or --seed-mode vmap (or auto) to split the seeds over the devices"
        )
    if mode == "auto":
        return "sequential" if jax.default_backend() == "cpu" and num_devices == 1 else "vmap"
    return mode


class SeedStates:
    """The training states of ``seeds`` and the steps that train and evaluate them.

    Args:
      model_cfg, loss_cfg, train_cfg: the run's configuration.
      seeds: the seeds, e.g. ``[0, 1, 2]``.
      mode: "vmap" or "sequential" (`resolve_seed_mode`).
      cache_dir: the disk cache of traced training programs (`TrainStepCompiler`); None: none.
      mesh: the devices (`SeedMesh`); None: the default device. Several need ``mode="vmap"``.
    """

    def __init__(
        self,
        model_cfg: ModelConfig,
        loss_cfg: LossConfig,
        train_cfg: TrainConfig,
        seeds: Sequence[int],
        mode: str,
        cache_dir=None,
        mesh: SeedMesh | None = None,
    ):
        self.model_cfg, self.train_cfg, self.seeds, self.mode = model_cfg, train_cfg, list(seeds), mode
        self.vmap = mode == "vmap"
        self.mesh = mesh or SeedMesh.create(1, len(self.seeds), train_cfg.batch_size)
        self.sharded = self.mesh.sharded
        if self.sharded and not self.vmap:
            raise ValueError("seeds stepped in turn run on one device")
        step = functools.partial(
            train_step,
            model_cfg=model_cfg,
            loss_cfg=loss_cfg,
            tx=make_optimizer(train_cfg),
            skip_nonfinite=train_cfg.on_nonfinite == "skip-step",
        )
        predict = functools.partial(predict_step, model_cfg=model_cfg)
        if self.vmap:
            step, predict = jax.vmap(step), jax.vmap(predict, in_axes=(0, None))
        m, shardings = self.mesh, None
        if self.sharded:
            shardings = StepShardings(m.seeds, m.train_batch, m.seeds, m.seeds)
            self._predict = jax.jit(predict, in_shardings=(m.seeds, m.eval_batch), out_shardings=m.seeds)
        else:
            self._predict = jax.jit(predict)
        self._train = TrainStepCompiler(
            jax.jit(step, donate_argnums=0),
            repr((model_cfg, loss_cfg, train_cfg, self.vmap)),
            cache_dir,
            None,
            shardings,
        )
        keys = [seed_keys(s)[1] for s in self.seeds]
        self._keys = self._place(jnp.stack(keys)) if self.vmap else keys
        self.state = None

    def _place(self, stacked: Any, sharding=None) -> Any:
        """``stacked`` (``[K, ...]`` leaves) on the mesh (split along the seed axis unless ``sharding``
        says otherwise); left as it is on one device."""
        return self.mesh.put(stacked, sharding or self.mesh.seeds) if self.sharded else stacked

    @property
    def aligned(self) -> bool:
        """Whether step ``i`` must have one shape for every seed."""
        return self.vmap

    def compile(self, example: Batch) -> None:
        """Compiles the training step for ``example``'s shape ``[B, T]`` before any state exists."""
        num_seeds = len(self.seeds) if self.vmap else None
        state = abstract_train_state(self.model_cfg, self.train_cfg, num_seeds)
        if self.vmap:
            self._train.compile(state, stack_batches([example] * len(self.seeds)), self._keys)
        else:
            self._train.compile(state, example, self._keys[0])

    def initialise(self) -> None:
        """Every seed's initial state on the device."""
        states = [create_train_state(self.model_cfg, self.train_cfg, s) for s in self.seeds]
        self.state = self._place(jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *states)) if self.vmap else states
        jax.block_until_ready(self.state)

    def load(self, stacked: Any) -> None:
        """Sets the states from a pytree of host arrays ``[K, ...]`` (a checkpoint); copies, so the device
        state never aliases host buffers that are rewritten later."""
        if self.sharded:
            self.state = self._place(jax.tree_util.tree_map(np.array, stacked))
        elif self.vmap:
            self.state = jax.tree_util.tree_map(jnp.array, stacked)
        else:
            self.state = [jax.tree_util.tree_map(lambda x: jnp.array(x[k]), stacked) for k in range(len(self.seeds))]

    def train_epoch(self, steps: Sequence[Sequence[Batch]]) -> list[list[dict]]:
        """Trains every seed on its batches; ``steps[i][k]`` is seed ``k``'s batch at step ``i``.

        Every batch of the pass is put on the device before the first step, and the metrics are fetched
        once after the last, so nothing waits on the host between steps. Returns the per-seed lists of
        step metrics (host scalars).
        """
        if self.vmap:
            batches = [stack_batches(step) for step in steps]
            batches = self._place(batches, self.mesh.train_batch) if self.sharded else jax.device_put(batches)
            stacked = []  # per step, metrics with a leading seed axis [K]
            for batch in batches:
                self.state, metrics = self._train(self.state, batch, self._keys)
                stacked.append(metrics)
            stacked = self.mesh.fetch(stacked)
            return [[{name: v[k] for name, v in m.items()} for m in stacked] for k in range(len(self.seeds))]
        batches = jax.device_put([list(step) for step in steps])
        per_seed = [[] for _ in self.seeds]
        for step in batches:
            for k, batch in enumerate(step):
                self.state[k], metrics = self._train(self.state[k], batch, self._keys[k])
                per_seed[k].append(metrics)
        return jax.device_get(per_seed)

    def params(self) -> Any:
        """The seeds' current parameters, as `predict` takes them."""
        return self.state.params if self.vmap else [s.params for s in self.state]

    def params_from_host(self, params: Any) -> Any:
        """``params`` (as `params` returns them, or host arrays ``[K, ...]``) in the form `predict` takes."""
        if self.vmap:
            return self._place(params) if self.sharded else jax.device_put(params)
        return [jax.device_put(jax.tree_util.tree_map(lambda x: x[k], params)) for k in range(len(self.seeds))]

    def predict(self, params: Any, batches: Sequence[Batch]) -> list[list[dict]]:
        """Per batch, per seed, the probabilities of `mister_jax.steps.predict_step` (host arrays).

        Every batch of every seed is dispatched before the first result is fetched.
        """
        if self.sharded:
            batches = [self.mesh.put(batch, self.mesh.eval_batch) for batch in batches]
        if self.vmap:
            stacked = self.mesh.fetch([self._predict(params, batch) for batch in batches])
            return [[{name: v[k] for name, v in out.items()} for k in range(len(self.seeds))] for out in stacked]
        return jax.device_get([[self._predict(p, batch) for p in params] for batch in batches])

    def copy_states_to(self, mirror) -> None:
        """Copies every seed's training state into a `mister_jax.runtime.host_mirror.HostMirror`."""
        if self.vmap:
            mirror.put_stacked(self.mesh.fetch(self.state) if self.sharded else self.state)
        else:
            for k, state in enumerate(self.state):
                mirror.put(k, state)

    def copy_params_to(self, mirror, ks: Sequence[int]) -> None:
        """Copies the current parameters of the seeds ``ks`` into their slots of ``mirror``; vmapped, the
        stacked parameters come to the host once for all of them."""
        if not ks:
            return
        if self.vmap:
            stacked = self.mesh.fetch(self.state.params)
            for k in ks:
                mirror.put(k, stacked, stacked=True)
        else:
            for k in ks:
                mirror.put(k, self.state[k].params)
