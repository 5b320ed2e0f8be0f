"""Modality-stacked multi-head attention for the multimodal network (Eq. 5–8): the kernel
`StackedMultiHeadAttention` and its plain reference `stacked_attention_reference`.

The speech and text branches of the multimodal network do the same computation with their own
weights, so they are evaluated together: activations carry a leading stream axis S (0: speech,
1: text) and every projection holds stacked weights [S, ...] (`mister_jax.layers`); all heads of all
streams are one einsum.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mister_jax.layers import StackedDense
from mister_jax.ops.dropout import Dropout

Array = jax.Array


class StackedMultiHeadAttention(nn.Module):
    """S independent multi-head scaled dot-product attentions of queries[s] over keys[s] (= values).

    Queries, keys and values are projected to `qkv_features` and split into `num_heads` contiguous
    heads; the heads' outputs are concatenated and projected to `out_features`. Padded keys get zero
    weight, and with `causal` so do future keys: query i attends to key j iff j <= i and j is real.
    A query whose conversation has no real key (an all-padding row) attends uniformly, so its output
    stays finite; such outputs are padding and ignored downstream.

    Attributes:
      num_heads: number of heads.
      qkv_features: total query/key/value width (split over the heads).
      out_features: output width.
      dropout_rate: dropout on the attention probabilities.
      initialization: "torch" or "flax" initialisation of the projections.
      dtype: compute dtype of the matmuls (softmax in float32).
      causal: whether future keys are masked (queries and keys are the same utterances).
    """

    num_heads: int
    qkv_features: int
    out_features: int
    dropout_rate: float = 0.0
    initialization: str = "torch"
    dtype: Any = jnp.float32
    causal: bool = False

    @nn.compact
    def __call__(self, queries: Array, keys: Array, key_mask: Array, deterministic: bool) -> Array:
        """Args: queries [S, B, Tq, F], keys [S, B, Tk, F], key_mask bool [B, Tk].

        Returns:
          [S, B, Tq, out_features].
        """
        head_dim = self.qkv_features // self.num_heads
        dense = lambda features, name: StackedDense(features, self.initialization, self.dtype, name=name)
        split_heads = lambda x: x.reshape(x.shape[:3] + (self.num_heads, head_dim))  # [S, B, T, heads, d]
        q = split_heads(dense(self.qkv_features, "query")(queries))
        k, v = jnp.split(dense(2 * self.qkv_features, "key_value")(keys), 2, axis=-1)
        k, v = split_heads(k), split_heads(v)
        logits = jnp.einsum("sbqhd,sbkhd->sbhqk", q, k).astype(jnp.float32) / jnp.sqrt(head_dim)
        allowed = key_mask[:, None, :]  # [B, 1, Tk]
        if self.causal:
            steps_q, steps_k = jnp.arange(q.shape[2])[:, None], jnp.arange(k.shape[2])[None, :]
            allowed = allowed & (steps_k <= steps_q)[None]  # [B, Tq, Tk]
        # The most negative float, not -inf: a row without real keys then softmaxes to uniform, not NaN.
        logits = jnp.where(allowed[None, :, None], logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1)  # [S, B, heads, Tq, Tk]
        weights = Dropout(self.dropout_rate)(weights, deterministic=deterministic)
        out = jnp.einsum("sbhqk,sbkhd->sbqhd", weights.astype(self.dtype), v)
        return dense(self.out_features, "out")(out.reshape(out.shape[:3] + (-1,)))


def stacked_attention_reference(
    params: dict, queries: Array, keys: Array, key_mask: Array, num_heads: int, causal: bool = False
) -> Array:
    """`StackedMultiHeadAttention` without dropout, in float32, one stream and one head at a time.

    For stream s and head h (columns h·d .. (h+1)·d - 1 of the projections, d = qkv_features / heads):
    attention = softmax over the real keys of q_h k_hᵀ / √d, output = attention v_h; the heads' outputs
    are concatenated and projected. A query row whose conversation has no real key attends uniformly
    to all keys (the kernel's convention for padding rows). With `causal`, query i is computed on its
    own over the keys 0 .. i alone (the first i + 1 rows of `keys`).

    Args:
      params: the parameter tree of `StackedMultiHeadAttention` (`query`, `key_value`, `out`, each with
        `kernels` [S, in, out] and `biases` [S, out]).
      queries: [S, B, Tq, F]; keys: [S, B, Tk, F]; key_mask: bool [B, Tk].
      num_heads: number of heads.
      causal: whether query i sees keys 0 .. i only.

    Returns:
      [S, B, Tq, out_features].
    """

    def project(name, s, x):
        return x @ params[name]["kernels"][s] + params[name]["biases"][s]

    if causal:
        per_query = [
            stacked_attention_reference(
                params, queries[:, :, i : i + 1], keys[:, :, : i + 1], key_mask[:, : i + 1], num_heads
            )
            for i in range(queries.shape[2])
        ]
        return jnp.concatenate(per_query, axis=2)
    qkv_features = params["query"]["kernels"].shape[-1]
    head_dim = qkv_features // num_heads
    real = key_mask[:, None, :]  # [B, 1, Tk]
    has_key = jnp.any(key_mask, axis=-1)[:, None, None]  # [B, 1, 1]
    outputs = []
    for s in range(queries.shape[0]):
        q = project("query", s, queries[s].astype(jnp.float32))  # [B, Tq, qkv]
        kv = project("key_value", s, keys[s].astype(jnp.float32))  # [B, Tk, 2 qkv]
        k, v = kv[..., :qkv_features], kv[..., qkv_features:]
        heads = []
        for h in range(num_heads):
            columns = slice(h * head_dim, (h + 1) * head_dim)
            scores = q[..., columns] @ jnp.swapaxes(k[..., columns], 1, 2) / head_dim**0.5  # [B, Tq, Tk]
            masked = jax.nn.softmax(jnp.where(real, scores, -jnp.inf), axis=-1)
            uniform = jnp.full_like(scores, 1.0 / scores.shape[-1])
            heads.append(jnp.where(has_key, masked, uniform) @ v[..., columns])  # [B, Tq, d]
        outputs.append(project("out", s, jnp.concatenate(heads, axis=-1)))
    return jnp.stack(outputs)
