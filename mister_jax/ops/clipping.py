"""Gradient clipping to a global norm with one scalar division (`clip_by_global_norm`), held to
`optax.clip_by_global_norm` by tests/test_ops_clipping.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


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
