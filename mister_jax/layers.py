"""Dense layers and LayerNorms of MiSTER-E, with the initialisation of the framework the paper trained in.

The paper trained in PyTorch at lr 1e-5 for 100 epochs, where weights move about as far as their initial
size, so the start is part of the model (DESIGN §3). Two schemes (`ModelConfig.init`):

  torch  every dense layer and convolution as `torch.nn.Linear` / `torch.nn.Conv1d` start: weights and
         biases U(-1/√fan_in, 1/√fan_in), fan_in = input width (× kernel size for a convolution).
  flax   flax's defaults: LeCun truncated-normal weights (std 1/√fan_in), zero biases.

LayerNorms start at scale one, bias zero under both.

Stacked layers hold S independent layers of the same shape ([S, ...] weights) for modality-stacked
activations (0: speech, 1: text): one kernel launch for both modalities, the numbers of two layers.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


def kernel_init(init: str, fan_in: int) -> nn.initializers.Initializer:
    """Initializer of a weight whose outputs each sum `fan_in` inputs."""
    if init == "torch":
        return uniform_init(fan_in**-0.5)
    return nn.initializers.truncated_normal(fan_in**-0.5 / _TRUNCATED_NORMAL_STD, lower=-2.0, upper=2.0)


def bias_init(init: str, fan_in: int) -> nn.initializers.Initializer:
    """Initializer of the bias of a layer with inputs of width `fan_in`."""
    return uniform_init(fan_in**-0.5) if init == "torch" else nn.initializers.zeros_init()


def uniform_init(bound: float) -> nn.initializers.Initializer:
    """U(-bound, bound)."""
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


_TRUNCATED_NORMAL_STD = 0.87962566103423978  # std of a standard normal truncated to [-2, 2]


class Dense(nn.Module):
    """y = x W + b with `kernel` [in, features] and `bias` [features] (the names of `flax.linen.Dense`).

    Attributes:
      features: output width.
      initialization: "torch" or "flax" (module docstring).
      dtype: compute dtype.
    """

    features: int
    initialization: str = "torch"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """Args: x [..., in]. Returns [..., features]."""
        fan_in = x.shape[-1]
        kernel = self.param("kernel", kernel_init(self.initialization, fan_in), (fan_in, self.features))
        bias = self.param("bias", bias_init(self.initialization, fan_in), (self.features,))
        return jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype)) + bias.astype(self.dtype)


class StackedDense(nn.Module):
    """S independent dense layers: y[s] = x[s] W[s] + b[s], `kernels` [S, in, features], `biases` [S, features].

    Attributes:
      features: output width.
      initialization: "torch" or "flax".
      dtype: compute dtype.
    """

    features: int
    initialization: str = "torch"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """Args: x [S, ..., in]. Returns [S, ..., features]."""
        streams, width = x.shape[0], x.shape[-1]
        kernels = self.param("kernels", kernel_init(self.initialization, width), (streams, width, self.features))
        biases = self.param("biases", bias_init(self.initialization, width), (streams, self.features))
        y = jnp.einsum("s...i,sio->s...o", x.astype(self.dtype), kernels.astype(self.dtype))
        return y + biases.reshape((streams,) + (1,) * (x.ndim - 2) + (self.features,)).astype(y.dtype)


class StackedLayerNorm(nn.Module):
    """S independent LayerNorms over the last axis, `scales` [S, F] (ones) and `biases` [S, F] (zeros).

    Attributes:
      epsilon: added to the variance (1e-6, as the authors' LayerNorms).
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
