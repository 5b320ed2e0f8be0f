"""Stacked bidirectional GRUs over padded conversations (the recurrent part of the CANs, Eq. 3–4).

Every (modality, direction) pair is a *stream* g with its own weights. All streams of one layer are
stepped together: the input projections x W_ih of every time step are one matmul outside the scan, and
each scan step does one batched W_hhᵀ h product over the stacked recurrent weights.

Inside the scan the state is feature-major, h [G, H, B]: with B a handful of conversations, the step's
product is then W_hhᵀ [3H, H] × h [H, B], a tall matrix times a thin one, which the CPU's matmul library
runs faster than the row-major h [B, H] × W_hh [H, 3H] (and the backward step's W_hh × dg [3H, B]
likewise; see docs/BENCHMARKS.md). The projections, the gates and the hidden states are laid out
[T, G, ·, B] to match, and transposed once per layer outside the scan.

The backward direction reads each batch in reverse over its longest conversation (length L): time
steps 0..L-1 are reversed, and so are the all-padding steps L..T-1, so no gather is needed. Every
stream carries its state unchanged over padded steps; a reversed conversation shorter than L starts
with padding, over which its state stays zero, so its backward pass begins at its last real utterance
exactly as if it stood alone. Steps where no stream has a real utterance (t >= L) are skipped.

The gradient of a layer is written by hand (`jax.custom_vjp`): the backward scan only carries dh
through the recurrent matmul; the weight gradients (e.g. Σ_t h_{t-1}ᵀ dg_t) and the input gradient
are large matmuls after it, instead of a [G, H, 3H] accumulation inside every step.

`bidirectional_gru_reference` computes what `BidirectionalGRU` computes the plain way (one row-major
`lax.scan` per stream, each conversation reversed on its own, JAX's own gradients), so tests can hold
the fused kernel's outputs and gradients equal to it.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp


def _gates(x_t: jax.Array, gh: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """r, z, n and the recurrent part h W_hn + b_hn of one GRU step (PyTorch gate layout r, z, n), from
    x_t, gh [G, 3H, B]; each [G, H, B]."""
    xr, xz, xn = jnp.split(x_t, 3, axis=1)
    hr, hz, hn = jnp.split(gh, 3, axis=1)
    r = jax.nn.sigmoid(xr + hr)
    z = jax.nn.sigmoid(xz + hz)
    n = jnp.tanh(xn + r * hn)
    return r, z, n, hn


def _recurrence(x_proj, hold, w_hh, b_hh, dtype):
    """The scan over time on x_proj [T, G, 3H, B]; returns hs [T, G, H, B] and the gates [T, G, 4H, B]
    (r, z, n, hn) for the VJP."""
    _, num_streams, three_h, batch = x_proj.shape
    hidden = three_h // 3
    w_hh_t = jnp.swapaxes(w_hh, 1, 2).astype(dtype)  # [G, 3H, H]

    def real_step(h, x_t, real_t):
        gh = jnp.einsum("gkh,ghb->gkb", w_hh_t, h.astype(dtype), preferred_element_type=jnp.float32)
        r, z, n, hn = _gates(x_t, gh + b_hh[:, :, None])
        h = jnp.where(real_t, (1.0 - z) * n + z * h, h)
        return h, jnp.concatenate([r, z, n, hn], axis=1)

    def padded_step(h, x_t, real_t):
        return h, jnp.zeros((num_streams, 4 * hidden, batch), jnp.float32)

    def step(h, inputs):
        x_t, real_t = inputs
        h, gates = jax.lax.cond(jnp.any(real_t), real_step, padded_step, h, x_t, real_t)
        return h, (h, gates)

    h0 = jnp.zeros((num_streams, hidden, batch), jnp.float32)
    _, (hs, gates) = jax.lax.scan(step, h0, (x_proj, hold))
    return hs, gates


def _input_projection(x, w_ih, b_ih, dtype):
    """x [G, B, T, I] → x W_ih + b_ih, time-major and feature-major [T, G, 3H, B] for the scan.

    The product is taken row-major, x [B·T, I] × W_ih [I, 3H] per stream, and transposed after: XLA:CPU
    has a bfloat16 kernel for that form, not for W_ihᵀ × xᵀ, and in float32 it is also the faster one."""
    x_proj = jnp.einsum("gbti,gik->gbtk", x.astype(dtype), w_ih.astype(dtype), preferred_element_type=jnp.float32)
    return jnp.transpose(x_proj, (2, 0, 3, 1)) + b_ih[None, :, :, None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def gru_layer(
    x: jax.Array, hold: jax.Array, w_ih: jax.Array, b_ih: jax.Array, w_hh: jax.Array, b_hh: jax.Array, dtype=jnp.float32
) -> jax.Array:
    """G independent GRUs (PyTorch gate layout r, z, n), stepped together in one `lax.scan`.

    h_t = (1 - z) * n + z * h_{t-1} with r, z = σ(x W_i{r,z} + b_i{r,z} + h W_h{r,z} + b_h{r,z}) and
    n = tanh(x W_in + b_in + r * (h W_hn + b_hn)); the initial state is zero. Where `hold` is False the
    state is carried unchanged, so padded steps never alter it; steps where `hold` is False for every
    stream and row are skipped. The input projections of all steps are one matmul before the scan.

    Args:
      x: [G, B, T, I] inputs of every stream, each in the time order its GRU reads them.
      hold: bool [T, G, 1, B], True at real steps.
      w_ih: [G, I, 3H], b_ih: [G, 3H] input weights and biases.
      w_hh: [G, H, 3H], b_hh: [G, 3H] recurrent weights and biases.
      dtype: compute dtype of the matmuls (accumulated and carried in float32).

    Returns:
      [T, G, H, B] hidden states, feature-major (at a padded step: the state carried over it).
    """
    return _recurrence(_input_projection(x, w_ih, b_ih, dtype), hold, w_hh, b_hh, dtype)[0]


def _layer_fwd(x, hold, w_ih, b_ih, w_hh, b_hh, dtype):
    hs, gates = _recurrence(_input_projection(x, w_ih, b_ih, dtype), hold, w_hh, b_hh, dtype)
    return hs, (x, hs, gates, hold, w_ih, w_hh)


def _layer_bwd(dtype, residuals, d_hs):
    """Backpropagation through time: dh flows back through h W_hh only; every weight gradient and the
    input gradient are large matmuls after the scan, on stream-major copies [G, B, T, ·]."""
    x, hs, gates, hold, w_ih, w_hh = residuals
    h_prev = jnp.concatenate([jnp.zeros_like(hs[:1]), hs[:-1]])  # [T, G, H, B]
    w_hh_compute = w_hh.astype(dtype)

    def real_step(dh, gates_t, h_prev_t, real_t):
        r, z, n, hn = jnp.split(gates_t, 4, axis=1)
        d_pre_n = dh * (1.0 - z) * (1.0 - n * n)
        d_pre_z = dh * (h_prev_t - n) * z * (1.0 - z)
        d_pre_r = d_pre_n * hn * r * (1.0 - r)
        d_x = jnp.where(real_t, jnp.concatenate([d_pre_r, d_pre_z, d_pre_n], axis=1), 0.0)
        d_gh = jnp.where(real_t, jnp.concatenate([d_pre_r, d_pre_z, d_pre_n * r], axis=1), 0.0)
        d_h_prev = jnp.where(real_t, dh * z, dh) + jnp.einsum(  # W_hh d_gh: [H, 3H] × [3H, B] per stream
            "ghk,gkb->ghb", w_hh_compute, d_gh.astype(dtype), preferred_element_type=jnp.float32
        )
        return d_h_prev, (d_x, d_gh)

    def padded_step(dh, gates_t, h_prev_t, real_t):
        zeros = jnp.zeros((dh.shape[0], 3 * dh.shape[1], dh.shape[2]), jnp.float32)
        return dh, (zeros, zeros)

    def step(dh, inputs):
        d_out_t, gates_t, h_prev_t, real_t = inputs
        return jax.lax.cond(jnp.any(real_t), real_step, padded_step, dh + d_out_t, gates_t, h_prev_t, real_t)

    _, (d_x_proj, d_gh) = jax.lax.scan(step, jnp.zeros_like(hs[0]), (d_hs, gates, h_prev, hold), reverse=True)
    d_b_ih, d_b_hh = jnp.sum(d_x_proj, axis=(0, 3)), jnp.sum(d_gh, axis=(0, 3))
    stream_major = lambda a: jnp.transpose(a, (1, 3, 0, 2)).astype(dtype)  # [T, G, ·, B] → [G, B, T, ·]
    d_x_proj, d_gh, h_prev = stream_major(d_x_proj), stream_major(d_gh), stream_major(h_prev)
    f32 = dict(preferred_element_type=jnp.float32)
    d_x = jnp.einsum("gbtk,gik->gbti", d_x_proj, w_ih.astype(dtype), **f32).astype(x.dtype)
    d_w_ih = jnp.einsum("gbti,gbtk->gik", x.astype(dtype), d_x_proj, **f32)
    d_w_hh = jnp.einsum("gbth,gbtk->ghk", h_prev, d_gh, **f32)
    return d_x, None, d_w_ih, d_b_ih, d_w_hh, d_b_hh


gru_layer.defvjp(_layer_fwd, _layer_bwd)


def reverse_conversations(x: jax.Array, length: jax.Array, axis: int) -> jax.Array:
    """Reverses steps 0..length-1 and, separately, steps length..T-1 of `x` along `axis` (an involution).

    With `length` the batch's longest conversation, each conversation is read backwards from its last
    utterance and the all-padding tail stays at the end. A flip and a dynamic roll: no gather.
    """
    size = x.shape[axis]
    return jnp.roll(jnp.flip(x, axis=axis), length - size, axis=axis)


def layer_params(module: nn.Module, layer: int, streams: int, width: int, hidden: int):
    """Layer ``layer``'s ``w_ih`` [G, I, 3H], ``b_ih`` [G, 3H], ``w_hh`` [G, H, 3H], ``b_hh`` [G, 3H] of ``module``
    (G streams of input width I), initialised U(-1/√H, 1/√H) as in PyTorch."""
    bound = 1.0 / hidden**0.5

    def init(key, shape):
        return jax.random.uniform(key, shape, jnp.float32, -bound, bound)

    return (
        module.param(f"w_ih_{layer}", init, (streams, width, 3 * hidden)),
        module.param(f"b_ih_{layer}", init, (streams, 3 * hidden)),
        module.param(f"w_hh_{layer}", init, (streams, hidden, 3 * hidden)),
        module.param(f"b_hh_{layer}", init, (streams, 3 * hidden)),
    )


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
        longest = jnp.sum(jnp.any(mask, axis=0))  # L
        reverse = functools.partial(reverse_conversations, length=longest)

        hold = jnp.stack([mask, reverse(mask, axis=1)])  # [2, B, T]
        hold = jnp.tile(hold, (num_modalities, 1, 1)).transpose(2, 0, 1)[:, :, None]  # [T, G, 1, B]
        for layer in range(self.layers):
            w_ih, b_ih, w_hh, b_hh = layer_params(self, layer, streams, width, hidden)
            x = jnp.where(mask[None, :, :, None], x, 0.0)
            both = jnp.stack([x, reverse(x, axis=2)], axis=1).reshape((streams, batch, length, width))
            hs = gru_layer(both, hold, w_ih, b_ih, w_hh, b_hh, self.dtype)  # [T, G, H, B]
            hs = jnp.transpose(hs, (1, 3, 0, 2)).reshape((num_modalities, 2, batch, length, hidden))
            x = jnp.concatenate([hs[:, 0], reverse(hs[:, 1], axis=2)], axis=-1)
            width = 2 * hidden
        return x


def gru_reference(x, mask, w_ih, b_ih, w_hh, b_hh):
    """One GRU over x [B, T, I] in time order, row-major state h [B, H]; the state is held where mask
    [B, T] is False. Returns [B, T, H]."""
    hidden = w_hh.shape[0]

    def step(h, inputs):
        x_t, real_t = inputs  # [B, I], [B]
        xr, xz, xn = jnp.split(x_t @ w_ih + b_ih, 3, axis=-1)
        hr, hz, hn = jnp.split(h @ w_hh + b_hh, 3, axis=-1)
        r = jax.nn.sigmoid(xr + hr)
        z = jax.nn.sigmoid(xz + hz)
        n = jnp.tanh(xn + r * hn)
        h = jnp.where(real_t[:, None], (1.0 - z) * n + z * h, h)
        return h, h

    h0 = jnp.zeros((x.shape[0], hidden), jnp.float32)
    _, hs = jax.lax.scan(step, h0, (jnp.swapaxes(x, 0, 1), mask.T))
    return jnp.swapaxes(hs, 0, 1)


def bidirectional_gru_reference(params: dict, x: jax.Array, mask: jax.Array, layers: int) -> jax.Array:
    """What `BidirectionalGRU` computes, the plain way, with JAX's own gradients.

    Each stream g = 2 m + d is its own row-major `lax.scan`; the backward direction (d = 1) reads every
    conversation of length n in the order n-1, ..., 0 by a gather of its own (padding left in place),
    and its outputs are put back in time order the same way.

    Args:
      params: `BidirectionalGRU`'s parameters (`w_ih_l` [2M, I, 3H], `b_ih_l`, `w_hh_l`, `b_hh_l`).
      x: [M, B, T, I] per-modality inputs.
      mask: bool [B, T], True on utterances, padding at the end of each row.
      layers: number of stacked bidirectional layers.

    Returns:
      [M, B, T, 2H] ([fwd; bwd]); only positions where mask is True are meaningful.
    """
    lengths = jnp.sum(mask, axis=1)  # [B]
    steps = jnp.arange(mask.shape[1])
    backwards = jnp.where(steps < lengths[:, None], lengths[:, None] - 1 - steps, steps)  # [B, T]
    reverse = jax.vmap(lambda row, order: row[order])  # per conversation
    outputs = []
    for m in range(x.shape[0]):
        h = x[m]  # [B, T, I]
        for layer in range(layers):
            weights = [
                [params[f"{name}_{layer}"][2 * m + d] for name in ("w_ih", "b_ih", "w_hh", "b_hh")] for d in (0, 1)
            ]
            forward = gru_reference(h, mask, *weights[0])
            backward = reverse(gru_reference(reverse(h, backwards), mask, *weights[1]), backwards)
            h = jnp.concatenate([forward, backward], axis=-1)
        outputs.append(h)
    return jnp.stack(outputs)
