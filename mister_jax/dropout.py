"""Dropout whose random draws cost a third of `flax.linen.Dropout`'s on CPU.

`flax.linen.Dropout` draws one 32-bit Threefry word per element, a noticeable share of a MiSTER-E
training step on a CPU (docs/BENCHMARKS.md). Here every 32-bit word gives two 16-bit uniform integers u, and an element
is kept where u >= round(rate · 2^16). The drop probability is thus rate rounded to a multiple of
2^-16 (0.2 becomes 0.19999695), and kept elements are scaled by the inverse of the exact keep
probability, so E[dropout(x)] = x as with flax.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

_LEVELS = 1 << 16


class Dropout(nn.Module):
  """Inverted dropout drawing from the "dropout" RNG collection.

  Attributes:
    rate: probability of zeroing an element, in [0, 1).
  """

  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    """Args: x of any shape. Returns x unchanged when deterministic, else the dropped-out x."""
    threshold = round(self.rate * _LEVELS)
    if deterministic or threshold == 0:
      return x
    words = jax.random.bits(self.make_rng("dropout"), (-(-x.size // 2),), jnp.uint32)
    draws = jax.lax.bitcast_convert_type(words, jnp.uint16).reshape(-1)[:x.size].reshape(x.shape)
    keep_probability = 1.0 - threshold / _LEVELS
    return jnp.where(draws >= threshold, x / jnp.asarray(keep_probability, x.dtype), jnp.zeros((), x.dtype))
