"""Stacked bidirectional GRUs over padded conversations (the recurrent part of the CANs, Eq. 3–4).

Every (modality, direction) pair is a *stream* g with its own weights. All streams of one layer are
stepped together: the input projections x W_ih of every time step are one matmul outside the scan, and
each scan step does one batched h W_hh einsum over the stacked recurrent weights [G, H, 3H].

The backward direction of a conversation starts at its last real utterance: the padded inputs are
flipped in time (cheap, no gather), scanned forwards and flipped back, and every stream carries its
state unchanged over padded steps. A flipped conversation starts with its padding, over which the
state stays zero, so the backward pass begins at the last real utterance exactly as if it stood alone.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def stacked_gru_scan(x_proj: jax.Array, hold: jax.Array, w_hh: jax.Array, b_hh: jax.Array,
                     dtype=jnp.float32) -> jax.Array:
  """Runs G independent GRUs (PyTorch gate layout r, z, n) in one `lax.scan`.

  h_t = (1 - z) * n + z * h_{t-1} with r, z = σ(x W_i{r,z} + b_i{r,z} + h W_h{r,z} + b_h{r,z}) and
  n = tanh(x W_in + b_in + r * (h W_hn + b_hn)); the initial state is zero. Where `hold` is False the
  state is carried unchanged, so padded steps never alter it.

  Args:
    x_proj: [T, G, B, 3H] input projections x W_ih + b_ih of every time step and stream.
    hold: bool [T, G, B, 1], True at real steps.
    w_hh: [G, H, 3H] recurrent weights.
    b_hh: [G, 3H] recurrent biases.
    dtype: compute dtype of the recurrent matmul (accumulated and carried in float32).

  Returns:
    [T, G, B, H] hidden states (at a padded step: the state carried over it).
  """
  _, num_streams, batch, three_h = x_proj.shape
  hidden = three_h // 3
  w_hh = w_hh.astype(dtype)

  def step(h, inputs):
    x_t, real_t = inputs
    gh = jnp.einsum("gbh,ghk->gbk", h.astype(dtype), w_hh, preferred_element_type=jnp.float32) + b_hh[:, None]
    xr, xz, xn = jnp.split(x_t, 3, axis=-1)
    hr, hz, hn = jnp.split(gh, 3, axis=-1)
    r = jax.nn.sigmoid(xr + hr)
    z = jax.nn.sigmoid(xz + hz)
    n = jnp.tanh(xn + r * hn)
    h = jnp.where(real_t, (1.0 - z) * n + z * h, h)
    return h, h

  h0 = jnp.zeros((num_streams, batch, hidden), jnp.float32)
  _, hs = jax.lax.scan(step, h0, (x_proj.astype(jnp.float32), hold))
  return hs


class BidirectionalGRU(nn.Module):
  """`layers` stacked bidirectional GRUs for M modalities, each with its own weights.

  Streams are ordered g = 2 m + d (m: modality, d: 0 forward, 1 backward). Parameters of layer l:
  `w_ih_l` [2M, 2H, 3H], `b_ih_l` [2M, 3H], `w_hh_l` [2M, H, 3H], `b_hh_l` [2M, 3H], initialised
  U(-1/√H, 1/√H) as in PyTorch.

  Attributes:
    hidden: H per direction.
    layers: number of stacked bidirectional layers.
    dtype: compute dtype of the matmuls.
  """

  hidden: int
  layers: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    """Args: x [M, B, T, 2H] per-modality inputs, mask bool [B, T]. Returns [M, B, T, 2H] ([fwd; bwd])."""
    num_modalities, batch, length, width = x.shape
    hidden = self.hidden
    streams = 2 * num_modalities
    bound = 1.0 / hidden ** 0.5

    def param(name, shape):
      return self.param(name, lambda key, s: jax.random.uniform(key, s, jnp.float32, -bound, bound), shape)

    hold = jnp.stack([mask, jnp.flip(mask, axis=1)])                               # [2, B, T]
    hold = jnp.tile(hold, (num_modalities, 1, 1)).transpose(2, 0, 1)[..., None]   # [T, G, B, 1]
    for layer in range(self.layers):
      w_ih = param(f"w_ih_{layer}", (streams, width, 3 * hidden))
      b_ih = param(f"b_ih_{layer}", (streams, 3 * hidden))
      w_hh = param(f"w_hh_{layer}", (streams, hidden, 3 * hidden))
      b_hh = param(f"b_hh_{layer}", (streams, 3 * hidden))
      x = jnp.where(mask[None, :, :, None], x, 0.0)
      both = jnp.stack([x, jnp.flip(x, axis=2)], axis=1).reshape((streams, batch, length, width))
      x_proj = jnp.einsum("gbti,gik->tgbk", both.astype(self.dtype), w_ih.astype(self.dtype),
                          preferred_element_type=jnp.float32) + b_ih[None, :, None]
      hs = stacked_gru_scan(x_proj, hold, w_hh, b_hh, self.dtype)                  # [T, G, B, H]
      hs = jnp.transpose(hs, (1, 2, 0, 3)).reshape((num_modalities, 2, batch, length, hidden))
      x = jnp.concatenate([hs[:, 0], jnp.flip(hs[:, 1], axis=2)], axis=-1)
      width = 2 * hidden
    return x
