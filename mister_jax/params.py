"""The parameter tree of `mister_jax.model.MisterE`: its shapes without allocating it, its
initialisation in one jitted program, and its size."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mister_jax.config import ModelConfig
from mister_jax.model import MisterE

Array = jax.Array


def _dummy_inputs(cfg: ModelConfig, batch: int = 1, length: int = 2):
    speech = jnp.zeros((batch, length, cfg.speech_dim), jnp.float32)
    text = jnp.zeros((batch, length, cfg.text_dim), jnp.float32)
    return speech, text, jnp.ones((batch, length), bool)


@functools.partial(jax.jit, static_argnums=0)
def _init_variables(cfg: ModelConfig, rng: Array) -> dict:
    return MisterE(cfg).init({"params": rng}, *_dummy_inputs(cfg), deterministic=True)["params"]


def param_shapes(cfg: ModelConfig) -> dict:
    """The parameter tree of `MisterE(cfg)` as `jax.ShapeDtypeStruct`s, without allocating it.

    The model is traced once per configuration (jit's cache, keyed on the frozen `cfg`): compiling the
    training shapes and initialising each seed all ask for these shapes, and tracing the model at paper
    dims is not free.
    """
    return _init_variables.eval_shape(cfg, jax.random.key(0))


def init_params(cfg: ModelConfig, rng: Array) -> dict:
    """Initial float32 parameters of `MisterE(cfg)`, each drawn by its module's initializer
    (`ModelConfig.init`, see `mister_jax.layers`), in one jitted program.

    The draws use JAX's original Threefry stream (`jax.threefry_partitionable(False)`: one hash per two
    32-bit words instead of one per word; the draw is never sharded), whose init program compiles faster
    and holds fewer temporaries.
    """
    with jax.threefry_partitionable(False):
        return _init_variables(cfg, rng)


def count_params(params) -> int:
    """Number of scalars in a parameter tree (arrays or `jax.ShapeDtypeStruct`s)."""
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))
