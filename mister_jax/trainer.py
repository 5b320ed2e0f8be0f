"""Pure, jitted training and evaluation steps of MiSTER-E (DESIGN §5; paper Sec. 4.2).

Adam with gradient clipping at a global norm, the total loss of Eq. 18 over the real, labelled
utterances of a padded batch. Randomness is explicit: seed ``s`` initialises with
``fold_in(key(s), 0)`` and step ``n`` draws dropout from ``fold_in(fold_in(key(s), 1), n)``, so a run
resumed from a checkpoint replays exactly the keys of an uninterrupted one.

Several seeds can train in one compiled step (``vmap=True``: every leaf of the state and batch gets a
leading seed axis ``[K, ...]``) or one after the other (``vmap=False``); both follow the same
trajectories up to float rounding.

For benchmarks::

    state, train_step = build_training(model_cfg, loss_cfg, train_cfg, seed=0)
    state, metrics = train_step(state, batch)   # batch: data.Batch of [B, T, ...] arrays
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mister_jax.config import LossConfig, ModelConfig
from mister_jax.data import Batch
from mister_jax.losses import total_loss
from mister_jax.model import MisterE, init_params, param_shapes
from mister_jax.presets import TrainConfig

EXPERT_FIELDS = {"speech": "speech_logits", "text": "text_logits", "multimodal": "multimodal_logits"}


class TrainState(flax.struct.PyTreeNode):
    """``step`` (int32 scalar, optimizer steps taken), ``params``, ``opt_state``."""

    step: jax.Array
    params: Any
    opt_state: Any


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """Gradient clipping to a global norm (Pascanu et al., 2013): ``g`` if ‖g‖ < max_norm, else
    ``g · (max_norm / ‖g‖)``, with ‖g‖ the norm of all leaves together.

    `optax.clip_by_global_norm` computes ``(g / ‖g‖) · max_norm`` element by element. XLA:CPU does not
    copy a division into both Adam moment updates that read its result, so it writes ``g / ‖g‖`` out
    in full (the size of the gradient) into fresh memory every step and reads it back twice. Here the
    division is one scalar, and the multiply fuses into each moment update. Results differ from optax's
    by at most one rounding of each element; the state is the same ``optax.EmptyState``.
    """

    def update(updates, state, params=None):
        del params
        norm = optax.tree.norm(updates)
        factor = max_norm / norm
        clip = lambda g: jnp.where(norm < max_norm, g, g * factor.astype(g.dtype))
        return jax.tree_util.tree_map(clip, updates), state

    return optax.GradientTransformation(optax.init_empty_state, update)


def make_optimizer(train_cfg: TrainConfig) -> optax.GradientTransformation:
    """Adam after clipping the gradient to global norm ``clip_norm`` (Sec. 4.2)."""
    return optax.chain(clip_by_global_norm(train_cfg.clip_norm), optax.adam(train_cfg.learning_rate))


@functools.partial(jax.jit, static_argnums=1)
def init_optimizer_state(params: Any, train_cfg: TrainConfig) -> Any:
    """Adam's zero moments and counters for ``params`` (jitted once per configuration; arrays or
    `jax.ShapeDtypeStruct`s through ``init_optimizer_state.eval_shape``)."""
    return make_optimizer(train_cfg).init(params)


def seed_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """``(init_key, dropout_key)`` of a seed."""
    key = jax.random.key(seed)
    return jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)


def create_train_state(model_cfg: ModelConfig, train_cfg: TrainConfig, seed: int) -> TrainState:
    """Initial state of one seed (jitted parameter init)."""
    params = init_params(model_cfg, seed_keys(seed)[0])
    return TrainState(jnp.zeros((), jnp.int32), params, init_optimizer_state(params, train_cfg))


def abstract_train_state(model_cfg: ModelConfig, train_cfg: TrainConfig, num_seeds: int | None = None) -> TrainState:
    """The shapes of ``create_train_state`` (``jax.ShapeDtypeStruct`` leaves) without computing it; with
    ``num_seeds`` every leaf gets a leading seed axis ``[K, ...]`` (vmapped training)."""
    params = param_shapes(model_cfg)
    state = TrainState(jax.ShapeDtypeStruct((), jnp.int32), params,
                       init_optimizer_state.eval_shape(params, train_cfg))
    if num_seeds is None:
        return state
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct((num_seeds,) + x.shape, x.dtype), state)


def stack_states(states: list) -> Any:
    """Stacks per-seed pytrees along a new leading seed axis ``[K, ...]`` (host NumPy arrays)."""
    return jax.tree_util.tree_map(lambda *xs: np.stack(xs), *jax.device_get(states))


def unstack_states(stacked: Any, num_seeds: int) -> list:
    """Inverse of ``stack_states`` (host NumPy arrays)."""
    return [jax.tree_util.tree_map(lambda x: np.asarray(x[k]), stacked) for k in range(num_seeds)]


def loss_fn(params: Any, batch: Batch, dropout_key: jax.Array, model_cfg: ModelConfig,
            loss_cfg: LossConfig, deterministic: bool = False) -> tuple[jax.Array, dict]:
    """Eq. 18 on one padded batch; utterances with label ``-1`` or ``mask=False`` are not scored.

    Args:
      batch: ``speech [B, T, Ds]`` (or None), ``text [B, T, Dt]``, ``labels [B, T]``, ``mask [B, T]``.
    Returns:
      ``(loss, terms)``: the scalar total loss and its named terms.
    """
    outputs = MisterE(model_cfg).apply({"params": params}, batch.speech, batch.text, batch.mask,
                                       deterministic=deterministic, rngs={"dropout": dropout_key})
    labelled = batch.mask & (batch.labels >= 0)
    with jax.named_scope("losses"):
        return total_loss(outputs, jnp.maximum(batch.labels, 0), labelled, loss_cfg, model_cfg.variant)


def train_step(state: TrainState, batch: Batch, dropout_key: jax.Array, *, model_cfg: ModelConfig,
               loss_cfg: LossConfig, tx: optax.GradientTransformation,
               skip_nonfinite: bool = False) -> tuple[TrainState, dict]:
    """One Adam step of one seed; dropout key ``fold_in(dropout_key, state.step)``.

    Returns the new state and scalar metrics: ``loss``, the loss terms, ``grad_norm`` (before
    clipping), ``nonfinite`` (the loss or the gradient norm is NaN or infinite) and ``utterances``
    (labelled utterances in the batch). With ``skip_nonfinite`` such a step leaves the parameters and
    Adam's moments as they were (the step counter still advances).
    """
    key = jax.random.fold_in(dropout_key, state.step)
    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, batch, key, model_cfg, loss_cfg)
    with jax.named_scope("optimizer"):
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        if skip_nonfinite:
            keep = lambda new, old: jnp.where(finite, new, old)
            params = jax.tree_util.tree_map(keep, params, state.params)
            opt_state = jax.tree_util.tree_map(keep, opt_state, state.opt_state)
    metrics = {"loss": loss, **terms, "grad_norm": grad_norm, "nonfinite": ~finite,
               "utterances": jnp.sum(batch.mask & (batch.labels >= 0))}
    return TrainState(state.step + 1, params, opt_state), metrics


def predict_step(params: Any, batch: Batch, *, model_cfg: ModelConfig) -> dict:
    """Deterministic forward pass: ``{"moe": probs [B, T, C], <expert>: probs, "gate": [B, T, 3]}``.

    ``moe`` is the final prediction (the only one for variants without experts); experts and the gate
    appear only when the variant has them.
    """
    outputs = MisterE(model_cfg).apply({"params": params}, batch.speech, batch.text, batch.mask,
                                       deterministic=True)
    out = {"moe": jax.nn.softmax(outputs.logits, axis=-1)}
    for name, field in EXPERT_FIELDS.items():
        logits = getattr(outputs, field)
        if logits is not None:
            out[name] = jax.nn.softmax(logits, axis=-1)
    if outputs.gate is not None:
        out["gate"] = outputs.gate.astype(jnp.float32)
    return out


def make_steps(model_cfg: ModelConfig, loss_cfg: LossConfig, train_cfg: TrainConfig, vmap: bool
               ) -> tuple[Callable, Callable]:
    """Jitted ``(train, predict)`` steps.

    ``train(state, batch, dropout_key) -> (state, metrics)``; ``predict(params, batch) -> probs``.
    With ``vmap`` every argument carries a leading seed axis ``[K, ...]`` except ``predict``'s batch,
    which all seeds share. The train step donates its state.
    """
    train = functools.partial(train_step, model_cfg=model_cfg, loss_cfg=loss_cfg, tx=make_optimizer(train_cfg),
                              skip_nonfinite=train_cfg.on_nonfinite == "skip-step")
    predict = functools.partial(predict_step, model_cfg=model_cfg)
    if vmap:
        train, predict = jax.vmap(train), jax.vmap(predict, in_axes=(0, None))
    return jax.jit(train, donate_argnums=0), jax.jit(predict)


def build_training(model_cfg: ModelConfig, loss_cfg: LossConfig, train_cfg: TrainConfig, seed: int = 0
                   ) -> tuple[TrainState, Callable]:
    """A fresh ``TrainState`` and ``step(state, batch) -> (state, metrics)`` for one seed.

    ``batch`` is a ``mister_jax.data.Batch`` of arrays ``speech [B, T, Ds]`` (None for text-only),
    ``text [B, T, Dt]``, ``labels int32 [B, T]`` (-1 = not scored), ``mask bool [B, T]``. The step is
    jitted (one compilation per distinct ``[B, T]``), donates its input state, and draws dropout from
    the seed's key folded with the step counter. Block on ``metrics["loss"]`` to time it.
    """
    train, _ = make_steps(model_cfg, loss_cfg, train_cfg, vmap=False)
    dropout_key = seed_keys(seed)[1]
    return create_train_state(model_cfg, train_cfg, seed), lambda state, batch: train(state, batch, dropout_key)
