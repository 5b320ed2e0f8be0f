"""Inverted dropout from 16-bit random draws: `dropout` (the function), `Dropout` (the module drawing its
key from the "dropout" RNG collection) and `dropout_reference` (the same keep mask computed in NumPy).

`flax.linen.Dropout` draws one 32-bit Threefry word per element, a noticeable share of a MiSTER-E
training step on a CPU (see docs/BENCHMARKS.md). Here every 32-bit word gives two 16-bit uniform
integers u, and an element is kept where u >= round(rate · 2^16). The drop probability is thus rate
rounded to a multiple of 2^-16 (0.2 becomes 0.19999695), and kept elements are scaled by the inverse
of the exact keep probability, so E[dropout(x)] = x as with flax.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

_LEVELS = 1 << 16


def _threshold(rate: float) -> int:
    """The drop threshold on 16-bit draws: an element is dropped where its draw is below it."""
    return round(rate * _LEVELS)


def dropout(key: jax.Array, x: jax.Array, rate: float) -> jax.Array:
    """x with each element zeroed with probability `rate` (rounded to a multiple of 2^-16) and the others
    divided by the keep probability.

    Element i of x (row-major) uses the i-th 16-bit half of `jax.random.bits(key, (⌈x.size / 2⌉,), uint32)`,
    low half first.

    Args:
      key: a PRNG key.
      x: any shape and floating dtype.
      rate: drop probability in [0, 1); 0 (after rounding) returns x itself.
    """
    threshold = _threshold(rate)
    if threshold == 0:
        return x
    words = jax.random.bits(key, (-(-x.size // 2),), jnp.uint32)  # [⌈N / 2⌉]
    draws = jax.lax.bitcast_convert_type(words, jnp.uint16).reshape(-1)[: x.size].reshape(x.shape)
    keep_probability = 1.0 - threshold / _LEVELS
    return jnp.where(draws >= threshold, x / jnp.asarray(keep_probability, x.dtype), jnp.zeros((), x.dtype))


class Dropout(nn.Module):
    """Inverted dropout (`dropout`) drawing its key from the "dropout" RNG collection.

    Attributes:
      rate: probability of zeroing an element, in [0, 1).
    """

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        """Args: x of any shape. Returns x unchanged when deterministic, else the dropped-out x."""
        if deterministic or _threshold(self.rate) == 0:
            return x
        return dropout(self.make_rng("dropout"), x, self.rate)


def dropout_reference(key: jax.Array, x, rate: float) -> np.ndarray:
    """`dropout` recomputed in NumPy from the same 32-bit words: each word's low and high 16 bits taken
    by masking and shifting, an element kept where its draw is at least round(rate · 2^16)."""
    x = np.asarray(x)
    threshold = round(rate * 65536)
    if threshold == 0:
        return x
    words = np.asarray(jax.random.bits(key, ((x.size + 1) // 2,), jnp.uint32)).astype(np.uint64)
    halves = np.stack([words & 0xFFFF, words >> 16], axis=-1).reshape(-1)[: x.size].reshape(x.shape)
    scale = np.asarray(1.0 - threshold / 65536, x.dtype)
    return np.where(halves >= threshold, x / scale, np.zeros((), x.dtype))
