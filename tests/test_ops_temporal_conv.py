"""Tests of mister_jax.ops.temporal_conv: the tap-matmul 'same' convolution against
`jax.lax.conv_general_dilated` and against explicit shifted sums in NumPy, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mister_jax.ops.temporal_conv import ConvWeights, temporal_conv, temporal_conv_reference


def _case(k, batch=2, length=7, width=5, features=6, seed=3):
    """x [B, T, D] and the kernel [D, k, F], bias [F] of a freshly initialised `ConvWeights`."""
    x = np.random.default_rng(seed).normal(size=(batch, length, width)).astype(np.float32)
    params = ConvWeights(k, features).init(jax.random.key(seed), width)["params"]
    return x, np.asarray(params["kernel"]), np.asarray(params["bias"])


def _shifted_sums_numpy(x, kernel, bias):
    """Σ_j x[t + j - k // 2] kernel[:, j] + bias in float64, with zeros beyond both edges."""
    k, length = kernel.shape[1], x.shape[1]
    padded = np.pad(np.asarray(x, np.float64), ((0, 0), (k // 2, k // 2), (0, 0)))
    return sum(padded[:, j : j + length] @ kernel[:, j] for j in range(k)) + bias


@pytest.mark.parametrize("k", [1, 3, 5])
def test_temporal_conv_equals_the_convolution_op(k):
    x, kernel, bias = _case(k)
    np.testing.assert_allclose(
        jax.jit(temporal_conv)(x, kernel, bias), temporal_conv_reference(x, kernel, bias), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("k", [1, 3, 5])
def test_reference_equals_shifted_sums_in_numpy(k):
    x, kernel, bias = _case(k)
    np.testing.assert_allclose(
        temporal_conv_reference(x, kernel, bias), _shifted_sums_numpy(x, kernel, bias), rtol=1e-5, atol=1e-5
    )


def test_a_sequence_shorter_than_the_kernel_sees_zeros_beyond_its_edges():
    x, kernel, bias = _case(5, length=2)
    np.testing.assert_allclose(
        temporal_conv(x, kernel, bias), _shifted_sums_numpy(x, kernel, bias), rtol=1e-5, atol=1e-5
    )


def test_gradients_equal_the_convolution_op():
    x, kernel, bias = _case(5)
    target = np.random.default_rng(4).normal(size=x.shape[:2] + (kernel.shape[-1],)).astype(np.float32)
    grads = lambda conv: jax.jit(jax.grad(lambda *a: jnp.sum(conv(*a) * target), argnums=(0, 1, 2)))(x, kernel, bias)
    for got, expected in zip(grads(temporal_conv), grads(temporal_conv_reference)):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_bfloat16_compute_accumulates_in_float32():
    x, kernel, bias = _case(3)
    y = temporal_conv(jnp.asarray(x, jnp.bfloat16), kernel, bias, jnp.bfloat16)
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(y, temporal_conv_reference(x, kernel, bias), atol=0.1)


def _left_padded_sums_numpy(x, kernel, bias):
    """Σ_j x[t + j - (k - 1)] kernel[:, j] + bias in float64: k - 1 zeros before the first step, none after."""
    k, length = kernel.shape[1], x.shape[1]
    padded = np.pad(np.asarray(x, np.float64), ((0, 0), (k - 1, 0), (0, 0)))
    return sum(padded[:, j : j + length] @ kernel[:, j] for j in range(k)) + bias


@pytest.mark.parametrize("k", [1, 3, 5])
def test_causal_temporal_conv_equals_the_left_padded_convolution_op(k):
    x, kernel, bias = _case(k)
    np.testing.assert_allclose(
        jax.jit(temporal_conv, static_argnums=(3, 4))(x, kernel, bias, jnp.float32, True),
        temporal_conv_reference(x, kernel, bias, causal=True),
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize("k", [3, 5])
def test_causal_reference_equals_left_padded_sums_in_numpy(k):
    x, kernel, bias = _case(k)
    np.testing.assert_allclose(
        temporal_conv_reference(x, kernel, bias, causal=True),
        _left_padded_sums_numpy(x, kernel, bias),
        rtol=1e-5,
        atol=1e-5,
    )


def test_causal_gradients_equal_the_convolution_op():
    x, kernel, bias = _case(5)
    target = np.random.default_rng(4).normal(size=x.shape[:2] + (kernel.shape[-1],)).astype(np.float32)
    conv = lambda *a: temporal_conv(*a, causal=True)
    conv_op = lambda *a: temporal_conv_reference(*a, causal=True)
    grads = lambda f: jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) * target), argnums=(0, 1, 2)))(x, kernel, bias)
    for got, expected in zip(grads(conv), grads(conv_op)):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
