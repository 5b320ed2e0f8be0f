"""1-D 'same' or causal convolution over the utterance axis as one matmul and k shifted sums (the
temporal inception's convolutions, Eq. 3).

A 'same' convolution of width k is Σ_j x[t + j - k // 2] W_j; the causal one (`ModelConfig.causal`) is
Σ_j x[t + j - (k - 1)] W_j, so that step t sees steps t - k + 1 .. t only (all k - 1 zeros of padding
on the left). Instead of a convolution op, x [B·T, D] is multiplied once by all k taps side by side,
W [D, k·F], giving every tap's output at every step; the convolution is then the sum of those k
outputs, each shifted in time, with zeros beyond the edges. On XLA:CPU that one large matmul costs
less than `nn.Conv`'s convolution op, which this replaced (measured with benchmarks/profile_step.py;
see docs/BENCHMARKS.md).

`temporal_conv_reference` is the same convolution through `jax.lax.conv_general_dilated`, for tests.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mister_jax.layers import bias_init, kernel_init

Array = jax.Array


class ConvWeights(nn.Module):
    """Kernel [D, k, F] and bias [F] of a 1-D convolution over time; fan-in D·k (`mister_jax.layers`).

    Tap j multiplies x[t + j - k // 2] ('same') or x[t + j - (k - 1)] (causal). The kernel is stored
    input-major (nn.Conv's is [k, D, F]) so that it is a [D, k·F] matrix without a copy.

    Attributes:
      width: kernel size k.
      features: F.
      initialization: "torch" or "flax".
    """

    width: int
    features: int
    initialization: str = "torch"

    @nn.compact
    def __call__(self, in_features: int) -> tuple[Array, Array]:
        """Args: in_features D. Returns (kernel [D, k, F], bias [F])."""
        fan_in = in_features * self.width
        kernel = self.param(
            "kernel", kernel_init(self.initialization, fan_in), (in_features, self.width, self.features)
        )
        bias = self.param("bias", bias_init(self.initialization, fan_in), (self.features,))
        return kernel, bias


def temporal_conv(x: Array, kernel: Array, bias: Array, dtype=jnp.float32, causal: bool = False) -> Array:
    """out[b, t] = Σ_j x[b, t + j - o] kernel[:, j] + bias, with x = 0 outside 0..T-1 and the offset
    o = k // 2 ('same') or o = k - 1 (causal: no step after t).

    Args:
      x: [B, T, D] inputs (in `dtype`).
      kernel: [D, k, F] taps (k odd), bias: [F].
      dtype: compute dtype of the matmul (accumulated in float32).
      causal: whether out[t] sees x up to t only.

    Returns:
      float32 [B, T, F].
    """
    batch, length, width = x.shape
    _, k, features = kernel.shape
    taps = jnp.dot(
        x.reshape(batch * length, width),
        kernel.reshape(width, k * features).astype(dtype),
        preferred_element_type=jnp.float32,
    ).reshape(batch, length, k, features)
    offset = k - 1 if causal else k // 2
    padded = jnp.pad(taps, ((0, 0), (offset, k - 1 - offset), (0, 0), (0, 0)))
    conv = sum(padded[:, j : j + length, j] for j in range(k))  # out[t] = Σ_j x[t + j - offset] W[:, j]
    return conv + bias


def temporal_conv_reference(x: Array, kernel: Array, bias: Array, causal: bool = False) -> Array:
    """`temporal_conv` as a convolution op: x [B, T, D], kernel [D, k, F], bias [F] → [B, T, F]; causal
    pads k - 1 zeros on the left and none on the right."""
    out = jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(1,),
        padding=[(kernel.shape[1] - 1, 0)] if causal else "SAME",
        dimension_numbers=("NWC", "IWO", "NWC"),
        precision=jax.lax.Precision.HIGHEST,
    )
    return out + bias
