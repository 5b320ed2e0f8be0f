"""Stacked forward-only GRUs over padded conversations: the recurrent part of the causal CANs
(`ModelConfig.causal`), where an utterance's context is the conversation so far.

The kernel is `mister_jax.ops.gru.gru_layer` with one stream per modality (g = m): every modality's
recurrence stepped together in one `lax.scan`, feature-major state, all-padding steps skipped and the
hand-written backward pass (see `mister_jax.ops.gru`). A forward GRU needs no reversal: padding lies
after each conversation's last utterance, and the state is only carried over it.

`forward_gru_reference` computes the same thing the plain way (one row-major `lax.scan` per modality,
JAX's own gradients), so tests can hold the kernel equal to it.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mister_jax.ops.gru import gru_layer, gru_reference, layer_params


class ForwardGRU(nn.Module):
    """`layers` stacked forward GRUs for M modalities, each with its own weights.

    Parameters of layer l: `w_ih_l` [M, I_l, 3H], `b_ih_l` [M, 3H], `w_hh_l` [M, H, 3H], `b_hh_l` [M, 3H]
    (I_0 the input width, I_l = H after), initialised U(-1/√H, 1/√H) as in PyTorch.

    Attributes:
      hidden: H.
      layers: number of stacked layers.
      dtype: compute dtype of the matmuls.
    """

    hidden: int
    layers: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """Args: x [M, B, T, I] per-modality inputs, mask bool [B, T]. Returns [M, B, T, H]."""
        num_modalities, batch, length, width = x.shape
        hidden = self.hidden

        hold = jnp.broadcast_to(mask.T[:, None, None, :], (length, num_modalities, 1, batch))  # [T, M, 1, B]
        for layer in range(self.layers):
            w_ih, b_ih, w_hh, b_hh = layer_params(self, layer, num_modalities, width, hidden)
            x = jnp.where(mask[None, :, :, None], x, 0.0)
            hs = gru_layer(x, hold, w_ih, b_ih, w_hh, b_hh, self.dtype)  # [T, M, H, B]
            x = jnp.transpose(hs, (1, 3, 0, 2))  # [M, B, T, H]
            width = hidden
        return x


def forward_gru_reference(params: dict, x: jax.Array, mask: jax.Array, layers: int) -> jax.Array:
    """What `ForwardGRU` computes, the plain way, with JAX's own gradients.

    Args:
      params: `ForwardGRU`'s parameters (`w_ih_l` [M, I, 3H], `b_ih_l`, `w_hh_l`, `b_hh_l`).
      x: [M, B, T, I] per-modality inputs.
      mask: bool [B, T], True on utterances, padding at the end of each row.
      layers: number of stacked layers.

    Returns:
      [M, B, T, H]; only positions where mask is True are meaningful.
    """
    outputs = []
    for m in range(x.shape[0]):
        h = x[m]  # [B, T, I]
        for layer in range(layers):
            h = gru_reference(h, mask, *(params[f"{name}_{layer}"][m] for name in ("w_ih", "b_ih", "w_hh", "b_hh")))
        outputs.append(h)
    return jnp.stack(outputs)
