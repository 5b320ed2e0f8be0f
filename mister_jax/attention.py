"""Modality-stacked multi-head attention for the multimodal network (Eq. 5–8).

The speech and text branches of the multimodal network do the same computation with their own
weights, so they are evaluated together: activations carry a leading stream axis S (0: speech,
1: text) and every projection holds stacked weights [S, ...] (`mister_jax.layers`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mister_jax.dropout import Dropout
from mister_jax.layers import StackedDense

Array = jax.Array


class StackedMultiHeadAttention(nn.Module):
    """S independent multi-head scaled dot-product attentions of queries[s] over keys[s] (= values).

    Queries, keys and values are projected to `qkv_features` and split into `num_heads` contiguous
    heads; the heads' outputs are concatenated and projected to `out_features`. Padded keys get zero
    weight. A query whose conversation has no real key (an all-padding row) attends uniformly, so its
    output stays finite; such outputs are padding and ignored downstream.

    Attributes:
      num_heads: number of heads.
      qkv_features: total query/key/value width (split over the heads).
      out_features: output width.
      dropout_rate: dropout on the attention probabilities.
      initialization: "torch" or "flax" initialisation of the projections.
      dtype: compute dtype of the matmuls (softmax in float32).
    """

    num_heads: int
    qkv_features: int
    out_features: int
    dropout_rate: float = 0.0
    initialization: str = "torch"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, queries: Array, keys: Array, key_mask: Array, deterministic: bool) -> Array:
        """Args: queries [S, B, Tq, F], keys [S, B, Tk, F], key_mask bool [B, Tk].

        Returns:
          [S, B, Tq, out_features].
        """
        head_dim = self.qkv_features // self.num_heads
        dense = lambda features, name: StackedDense(features, self.initialization, self.dtype, name=name)
        split_heads = lambda x: x.reshape(x.shape[:3] + (self.num_heads, head_dim))
        q = split_heads(dense(self.qkv_features, "query")(queries))
        k, v = jnp.split(dense(2 * self.qkv_features, "key_value")(keys), 2, axis=-1)
        k, v = split_heads(k), split_heads(v)
        logits = jnp.einsum("sbqhd,sbkhd->sbhqk", q, k).astype(jnp.float32) / jnp.sqrt(head_dim)
        logits = jnp.where(key_mask[None, :, None, None, :], logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1)
        weights = Dropout(self.dropout_rate)(weights, deterministic=deterministic)
        out = jnp.einsum("sbhqk,sbkhd->sbqhd", weights.astype(self.dtype), v)
        return dense(self.out_features, "out")(out.reshape(out.shape[:3] + (-1,)))
