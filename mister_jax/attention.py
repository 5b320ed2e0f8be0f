"""Modality-stacked layers for the multimodal network (Eq. 5–8).

The speech and text branches of the multimodal network do the same computation with their own
weights, so they are evaluated together: activations carry a leading stream axis S (0: speech,
1: text) and every layer holds stacked weights [S, ...]. This halves the number of kernels XLA
compiles and launches; the numbers are those of two separate layers.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mister_jax.dropout import Dropout

Array = jax.Array


class StackedDense(nn.Module):
    """S independent dense layers: y[s] = x[s] W[s] + b[s].

    Parameters: `kernels` [S, in, features] (LeCun truncated normal), `biases` [S, features] (zeros).

    Attributes:
      features: output width.
      dtype: compute dtype.
    """

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """Args: x [S, ..., in]. Returns [S, ..., features]."""
        streams, width = x.shape[0], x.shape[-1]
        kernels = self.param("kernels", nn.initializers.lecun_normal(batch_axis=(0,)),
                             (streams, width, self.features))
        biases = self.param("biases", nn.initializers.zeros, (streams, self.features))
        y = jnp.einsum("s...i,sio->s...o", x.astype(self.dtype), kernels.astype(self.dtype))
        return y + biases.reshape((streams,) + (1,) * (x.ndim - 2) + (self.features,)).astype(y.dtype)


class StackedLayerNorm(nn.Module):
    """S independent LayerNorms over the last axis (ε = 1e-6, as flax's LayerNorm).

    Parameters: `scales` [S, F] (ones), `biases` [S, F] (zeros).
    """

    epsilon: float = 1e-6

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """Args: x [S, ..., F]. Returns float32 [S, ..., F]."""
        streams, width = x.shape[0], x.shape[-1]
        shape = (streams,) + (1,) * (x.ndim - 2) + (width,)
        scales = self.param("scales", nn.initializers.ones, (streams, width)).reshape(shape)
        biases = self.param("biases", nn.initializers.zeros, (streams, width)).reshape(shape)
        x = x.astype(jnp.float32)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        variance = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(variance + self.epsilon) * scales + biases


class StackedMultiHeadAttention(nn.Module):
    """S independent multi-head scaled dot-product attentions of queries[s] over keys[s] (= values).

    Padded keys get zero weight. A query whose conversation has no real key (an all-padding row)
    attends uniformly, so its output stays finite; such outputs are padding and ignored downstream.

    Attributes:
      num_heads: number of heads.
      qkv_features: total query/key/value width (split over the heads).
      out_features: output width.
      dropout_rate: dropout on the attention weights.
      dtype: compute dtype of the matmuls (softmax in float32).
    """

    num_heads: int
    qkv_features: int
    out_features: int
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, queries: Array, keys: Array, key_mask: Array, deterministic: bool) -> Array:
        """Args: queries [S, B, Tq, F], keys [S, B, Tk, F], key_mask bool [B, Tk].

        Returns:
          [S, B, Tq, out_features].
        """
        head_dim = self.qkv_features // self.num_heads
        split_heads = lambda x: x.reshape(x.shape[:3] + (self.num_heads, head_dim))
        q = split_heads(StackedDense(self.qkv_features, self.dtype, name="query")(queries))
        k, v = jnp.split(StackedDense(2 * self.qkv_features, self.dtype, name="key_value")(keys), 2, axis=-1)
        k, v = split_heads(k), split_heads(v)
        logits = jnp.einsum("sbqhd,sbkhd->sbhqk", q, k).astype(jnp.float32) / jnp.sqrt(head_dim)
        logits = jnp.where(key_mask[None, :, None, None, :], logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1)
        weights = Dropout(self.dropout_rate)(weights, deterministic=deterministic)
        out = jnp.einsum("sbhqk,sbkhd->sbqhd", weights.astype(self.dtype), v)
        return StackedDense(self.out_features, self.dtype, name="out")(out.reshape(out.shape[:3] + (-1,)))
