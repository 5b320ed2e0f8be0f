"""Pure training and evaluation steps of one seed (DESIGN §5; paper Sec. 4.2).

Adam with gradient clipping at a global norm, the total loss of Eq. 18 over the real, labelled
utterances of a padded batch. Randomness is explicit: seed ``s`` initialises with
``fold_in(key(s), 0)`` and step ``n`` draws dropout from ``fold_in(fold_in(key(s), 1), n)``, so a run
resumed from a checkpoint replays exactly the keys of an uninterrupted one. `mister_jax.seeds` runs
these steps for several seeds at once.

    state = create_train_state(model_cfg, train_cfg, seed=0)
    tx = make_optimizer(train_cfg)
    state, metrics = train_step(state, batch, seed_keys(0)[1], model_cfg=model_cfg, loss_cfg=loss_cfg, tx=tx)
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from mister_jax.augmentation import apply_modality_dropout
from mister_jax.config import LossConfig, ModelConfig, TrainConfig
from mister_jax.input_pipeline import Batch
from mister_jax.losses import total_loss
from mister_jax.metrics import GATE_EXPERTS
from mister_jax.model import MisterE
from mister_jax.ops.clipping import clip_by_global_norm
from mister_jax.params import init_params, param_shapes

MODALITY_DROPOUT_STREAM = 2  # fold_in index of the modality-dropout draws; the layers' dropout uses the key itself
EXPERT_FIELDS = {e: f"{e}_logits" for e in GATE_EXPERTS}  # expert name -> its ModelOutputs field


class TrainState(flax.struct.PyTreeNode):
    """``step`` (int32 scalar, optimizer steps taken), ``params``, ``opt_state``."""

    step: jax.Array
    params: Any
    opt_state: Any


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
    ``num_seeds`` every leaf gets a leading seed axis ``[K, ...]``."""
    params = param_shapes(model_cfg)
    state = TrainState(jax.ShapeDtypeStruct((), jnp.int32), params, init_optimizer_state.eval_shape(params, train_cfg))
    if num_seeds is None:
        return state
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct((num_seeds,) + x.shape, x.dtype), state)


def loss_fn(
    params: Any,
    batch: Batch,
    dropout_key: jax.Array,
    model_cfg: ModelConfig,
    loss_cfg: LossConfig,
    deterministic: bool = False,
) -> tuple[jax.Array, dict]:
    """Eq. 18 on one padded batch; utterances with label ``-1`` or ``mask=False`` are not scored.

    Args:
      batch: ``speech [B, T, Ds]`` (or None), ``text [B, T, Dt]``, ``labels [B, T]``, ``mask [B, T]``.
    Returns:
      ``(loss, terms)``: the scalar total loss and its named terms. With
      `ModelConfig.modality_dropout` a training batch first loses one modality of some conversations
      (`mister_jax.augmentation.apply_modality_dropout`).
    """
    speech, text = batch.speech, batch.text
    if model_cfg.modality_dropout > 0 and not deterministic and speech is not None:
        speech, text = apply_modality_dropout(
            speech, text, model_cfg.modality_dropout, jax.random.fold_in(dropout_key, MODALITY_DROPOUT_STREAM)
        )
    outputs = MisterE(model_cfg).apply(
        {"params": params}, speech, text, batch.mask, deterministic=deterministic, rngs={"dropout": dropout_key}
    )
    labelled = batch.mask & (batch.labels >= 0)
    with jax.named_scope("losses"):
        return total_loss(outputs, jnp.maximum(batch.labels, 0), labelled, loss_cfg, model_cfg.variant)


def train_step(
    state: TrainState,
    batch: Batch,
    dropout_key: jax.Array,
    *,
    model_cfg: ModelConfig,
    loss_cfg: LossConfig,
    tx: optax.GradientTransformation,
    skip_nonfinite: bool = False,
) -> tuple[TrainState, dict]:
    """One Adam step of one seed; dropout key ``fold_in(dropout_key, state.step)``.

    Returns the new state and scalar metrics: ``loss``, the loss terms, ``grad_norm`` (before
    clipping), ``nonfinite`` (the loss or the gradient norm is NaN or infinite) and ``utterances``
    (labelled utterances in the batch). With ``skip_nonfinite`` such a step leaves the parameters and
    Adam's moments as they were (the step counter still advances).
    """
    key = jax.random.fold_in(dropout_key, state.step)
    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, key, model_cfg, loss_cfg)
    with jax.named_scope("optimizer"):
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        if skip_nonfinite:
            keep = lambda new, old: jnp.where(finite, new, old)
            params = jax.tree_util.tree_map(keep, params, state.params)
            opt_state = jax.tree_util.tree_map(keep, opt_state, state.opt_state)
    metrics = {
        "loss": loss,
        **terms,
        "grad_norm": grad_norm,
        "nonfinite": ~finite,
        "utterances": jnp.sum(batch.mask & (batch.labels >= 0)),
    }
    return TrainState(state.step + 1, params, opt_state), metrics


def predict_step(params: Any, batch: Batch, *, model_cfg: ModelConfig) -> dict:
    """Deterministic forward pass: ``{"moe": probs [B, T, C], <expert>: probs, "gate": [B, T, 3]}``.

    ``moe`` is the final prediction (the only one for variants without experts); experts and the gate
    appear only when the variant has them.
    """
    outputs = MisterE(model_cfg).apply({"params": params}, batch.speech, batch.text, batch.mask, deterministic=True)
    out = {"moe": jax.nn.softmax(outputs.logits, axis=-1)}
    for name, field in EXPERT_FIELDS.items():
        logits = getattr(outputs, field)
        if logits is not None:
            out[name] = jax.nn.softmax(logits, axis=-1)
    if outputs.gate is not None:
        out["gate"] = outputs.gate.astype(jnp.float32)
    return out
