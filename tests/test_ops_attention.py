"""Tests of mister_jax.ops.attention: the stacked multi-head attention against one stream and one head
at a time, padded keys, an all-padding conversation and attention dropout."""

import jax
import jax.numpy as jnp
import numpy as np

from mister_jax.ops.attention import StackedMultiHeadAttention, stacked_attention_reference

HEADS = 2


def _case(key_lengths=(5, 2), steps=5, features=6, seed=0):
    """(attention, params, queries [2, B, T, F], keys [2, B, T, F], key_mask [B, T])."""
    rng = np.random.default_rng(seed)
    queries, keys = (rng.normal(size=(2, len(key_lengths), steps, features)).astype(np.float32) for _ in range(2))
    key_mask = np.arange(steps)[None, :] < np.array(key_lengths)[:, None]
    attention = StackedMultiHeadAttention(HEADS, qkv_features=4, out_features=3, dropout_rate=0.5)
    params = attention.init(jax.random.key(seed), queries, keys, key_mask, deterministic=True)["params"]
    return attention, params, queries, keys, key_mask


def test_equals_per_stream_per_head_softmax_attention():
    attention, params, queries, keys, key_mask = _case()
    got = jax.jit(attention.apply, static_argnums=4)({"params": params}, queries, keys, key_mask, True)
    expected = stacked_attention_reference(params, queries, keys, key_mask, HEADS)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_padded_keys_do_not_change_the_output():
    attention, params, queries, keys, key_mask = _case()
    garbage = np.where(key_mask[None, :, :, None], keys, 1e3)
    apply = jax.jit(attention.apply, static_argnums=4)
    np.testing.assert_array_equal(
        apply({"params": params}, queries, keys, key_mask, True),
        apply({"params": params}, queries, garbage, key_mask, True),
    )


def test_a_conversation_without_real_keys_attends_uniformly():
    attention, params, queries, keys, key_mask = _case(key_lengths=(5, 0))
    got = attention.apply({"params": params}, queries, keys, key_mask, True)[:, 1]  # [2, T, out]
    kv, out = params["key_value"], params["out"]
    values = jnp.einsum("stf,sfo->sto", keys[:, 1], kv["kernels"][..., 4:]) + kv["biases"][:, None, 4:]
    expected = jnp.einsum("sf,sfo->so", values.mean(axis=1), out["kernels"]) + out["biases"]  # [2, out]
    np.testing.assert_allclose(got, np.broadcast_to(expected[:, None], got.shape), rtol=1e-5, atol=1e-6)


def test_attention_dropout_acts_only_when_not_deterministic():
    attention, params, queries, keys, key_mask = _case()
    apply = lambda deterministic, seed: attention.apply(
        {"params": params}, queries, keys, key_mask, deterministic, rngs={"dropout": jax.random.key(seed)}
    )
    assert not np.allclose(apply(False, 1), apply(False, 2))
    np.testing.assert_array_equal(apply(True, 1), apply(True, 2))


def _causal(key_lengths=(5, 3)):
    attention, params, queries, keys, key_mask = _case(key_lengths)
    causal = StackedMultiHeadAttention(HEADS, qkv_features=4, out_features=3, causal=True)
    return causal, params, queries, keys, key_mask


def test_causal_equals_each_query_attending_to_the_keys_up_to_it():
    # Queries and keys of the same utterances, as in the model; the second conversation is padded.
    attention, params, queries, keys, key_mask = _causal()
    got = jax.jit(attention.apply, static_argnums=4)({"params": params}, queries, keys, key_mask, True)
    expected = stacked_attention_reference(params, queries, keys, key_mask, HEADS, causal=True)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_causal_reference_of_the_first_query_is_attention_to_the_first_key_alone():
    # softmax over one key is 1: the output is that key's value projected, whatever the query.
    _, params, queries, keys, key_mask = _causal()
    got = stacked_attention_reference(params, queries, keys, key_mask, HEADS, causal=True)[:, :, 0]  # [2, B, out]
    kv, out = params["key_value"], params["out"]
    values = jnp.einsum("sbf,sfo->sbo", keys[:, :, 0], kv["kernels"][..., 4:]) + kv["biases"][:, None, 4:]
    expected = jnp.einsum("sbf,sfo->sbo", values, out["kernels"]) + out["biases"][:, None]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
