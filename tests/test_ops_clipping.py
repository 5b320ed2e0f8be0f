"""Tests of mister_jax.ops.clipping: clip_by_global_norm against optax.clip_by_global_norm."""

import jax
import numpy as np
import optax

from mister_jax.ops.clipping import clip_by_global_norm


def _grads(seed=0):
    rng = np.random.default_rng(seed)
    return {"w": rng.normal(size=(60, 50)).astype(np.float32), "b": {"c": rng.normal(size=(50,)).astype(np.float32)}}


def _norm(tree):
    return np.sqrt(sum(np.sum(np.square(np.asarray(g, np.float64))) for g in jax.tree.leaves(tree)))


def _update(transform, grads):
    return jax.jit(lambda g: transform.update(g, transform.init(g))[0])(grads)


def test_above_the_norm_equals_optax_to_one_rounding():
    grads = _grads()
    ours, theirs = _update(clip_by_global_norm(1.0), grads), _update(optax.clip_by_global_norm(1.0), grads)
    for got, expected in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
        # g · fl(1 / ‖g‖) rounds twice, fl(g / ‖g‖) · 1 once: with float32's unit roundoff u = 2^-24 the
        # two differ by at most 3u relative, the rounding of the scalar factor carried into each element.
        np.testing.assert_allclose(got, expected, rtol=3 * 2.0**-24, atol=0)


def test_above_the_norm_scales_to_the_norm():
    clipped = _update(clip_by_global_norm(2.0), _grads())
    np.testing.assert_allclose(_norm(clipped), 2.0, rtol=1e-6)


def test_below_the_norm_leaves_the_gradient_unchanged():
    grads = _grads()
    unclipped = _update(clip_by_global_norm(2.0 * _norm(grads)), grads)
    for got, g in zip(jax.tree.leaves(unclipped), jax.tree.leaves(grads)):
        np.testing.assert_array_equal(got, g)


def test_the_state_is_optax_empty_state():
    assert clip_by_global_norm(1.0).init(_grads()) == optax.clip_by_global_norm(1.0).init(_grads())
