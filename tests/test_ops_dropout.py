"""Tests of mister_jax.ops.dropout: the keep mask against a NumPy recomputation from the same key, the
drop rate and the expectation, the deterministic pass and the key dependence of the module."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mister_jax.ops.dropout import Dropout, dropout, dropout_reference


def _apply(rate, x, key, deterministic=False):
    return Dropout(rate).apply({}, x, deterministic, rngs={"dropout": key})


@pytest.mark.parametrize("rate", [0.2, 0.5])
def test_equals_the_numpy_reference_from_the_same_key(rate):
    # 3 · 7 · 5 = 105 elements: an odd count, so the last 32-bit word is used by half.
    x = jax.random.normal(jax.random.key(1), (3, 7, 5))
    key = jax.random.key(2)
    np.testing.assert_array_equal(jax.jit(dropout, static_argnums=2)(key, x, rate), dropout_reference(key, x, rate))


class _FirstDropoutKey(nn.Module):
    """The key a top-level module's first `make_rng("dropout")` returns."""

    @nn.compact
    def __call__(self):
        return self.make_rng("dropout")


def test_the_module_is_the_function_on_its_first_dropout_key():
    x = jax.random.normal(jax.random.key(1), (4, 9))
    key = jax.random.key(3)
    module_key = _FirstDropoutKey().apply({}, rngs={"dropout": key})
    np.testing.assert_array_equal(_apply(0.5, x, key), dropout(module_key, x, 0.5))


@pytest.mark.parametrize("rate", [0.2, 0.5])
def test_drops_the_configured_fraction_and_keeps_the_mean(rate):
    x = jnp.ones((101, 999))  # an odd number of elements: the last 32-bit word is used by half
    y = np.asarray(_apply(rate, x, jax.random.key(0)))
    dropped = np.mean(y == 0)
    # 100,899 Bernoulli draws: 5 standard deviations of the dropped fraction is < 0.008.
    assert abs(dropped - rate) < 0.008
    kept = y[y != 0]
    np.testing.assert_allclose(kept, 1.0 / (1.0 - round(rate * 65536) / 65536), rtol=1e-6)
    assert abs(y.mean() - 1.0) < 0.02


def test_deterministic_or_zero_rate_is_the_identity():
    x = jax.random.normal(jax.random.key(1), (4, 7))
    np.testing.assert_array_equal(_apply(0.5, x, jax.random.key(2), deterministic=True), x)
    np.testing.assert_array_equal(_apply(0.0, x, jax.random.key(2)), x)


def test_masks_depend_on_the_key_only():
    x = jnp.ones((64, 64))
    first, again, other = (_apply(0.5, x, jax.random.key(k)) for k in (3, 3, 4))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
