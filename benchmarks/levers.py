"""The GRU recurrence, the largest cost of a MiSTER-E step, written three ways in JAX and timed.

- naive:   one `lax.scan` per (modality, direction, layer); the cell does x W_i + h W_h each step
           (what `flax.linen.RNN(GRUCell)` does).
- hoisted: x W_i for every time step as one large matmul before the scan; the scan does only h W_h.
- fused:   hoisted, and the four recurrences of a layer (speech/text × forward/backward) stepped
           together in one scan as one batched matmul [4, B, H] × [4, H, 3H].
All three compute the same function (PyTorch GRU equations); the backward direction stays on the
real utterances by holding the state at zero over padded steps, so padding never leaks in.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def init_gru(key, streams: int, layers: int, in_dim: int, hidden: int):
    """Parameters [layers] of {wi [S, 2, Din, 3H], wh [S, 2, H, 3H], bi, bh [S, 2, 3H]}."""
    params = []
    for layer in range(layers):
        d = in_dim if layer == 0 else 2 * hidden
        key, k1, k2 = jax.random.split(key, 3)
        scale = hidden ** -0.5
        params.append({"wi": jax.random.uniform(k1, (streams, 2, d, 3 * hidden), minval=-scale, maxval=scale),
                       "wh": jax.random.uniform(k2, (streams, 2, hidden, 3 * hidden), minval=-scale, maxval=scale),
                       "bi": jnp.zeros((streams, 2, 3 * hidden)), "bh": jnp.zeros((streams, 2, 3 * hidden))})
    return params


def _gates(gi, gh, h):
    """PyTorch GRU update from input part gi [.., 3H] and hidden part gh [.., 3H]."""
    ir, iz, inn = jnp.split(gi, 3, -1)
    hr, hz, hn = jnp.split(gh, 3, -1)
    r = jax.nn.sigmoid(ir + hr)
    z = jax.nn.sigmoid(iz + hz)
    n = jnp.tanh(inn + r * hn)
    return (1 - z) * n + z * h


def _reverse(x, axis=1):
    return jnp.flip(x, axis)


def naive(params, xs, mask):
    """xs [S, B, T, D], mask [B, T] → [S, B, T, 2H]; one scan per stream and direction, projection inside."""
    outs = []
    for s in range(xs.shape[0]):
        x = xs[s]
        for p in params:
            dirs = []
            for d in range(2):
                wi, wh, bi, bh = p["wi"][s, d], p["wh"][s, d], p["bi"][s, d], p["bh"][s, d]
                seq, m = (x, mask) if d == 0 else (_reverse(x), _reverse(mask))

                def step(h, inp, wi=wi, wh=wh, bi=bi, bh=bh):
                    xt, mt = inp
                    new = _gates(xt @ wi + bi, h @ wh + bh, h)
                    h = jnp.where(mt[:, None], new, h)
                    return h, h

                h0 = jnp.zeros((x.shape[0], wh.shape[0]), x.dtype)
                _, ys = jax.lax.scan(step, h0, (jnp.swapaxes(seq, 0, 1), m.T))
                ys = jnp.swapaxes(ys, 0, 1)
                dirs.append(ys if d == 0 else _reverse(ys))
            x = jnp.concatenate(dirs, -1)
        outs.append(x)
    return jnp.stack(outs)


def hoisted(params, xs, mask):
    """As `naive`, with x W_i for all steps computed before each scan."""
    outs = []
    for s in range(xs.shape[0]):
        x = xs[s]
        for p in params:
            dirs = []
            for d in range(2):
                wh, bh = p["wh"][s, d], p["bh"][s, d]
                gi = x @ p["wi"][s, d] + p["bi"][s, d]
                seq, m = (gi, mask) if d == 0 else (_reverse(gi), _reverse(mask))

                def step(h, inp, wh=wh, bh=bh):
                    git, mt = inp
                    h = jnp.where(mt[:, None], _gates(git, h @ wh + bh, h), h)
                    return h, h

                h0 = jnp.zeros((x.shape[0], wh.shape[0]), x.dtype)
                _, ys = jax.lax.scan(step, h0, (jnp.swapaxes(seq, 0, 1), m.T))
                ys = jnp.swapaxes(ys, 0, 1)
                dirs.append(ys if d == 0 else _reverse(ys))
            x = jnp.concatenate(dirs, -1)
        outs.append(x)
    return jnp.stack(outs)


def fused(params, xs, mask):
    """As `hoisted`, with all streams and both directions of a layer in one scan (batched matmul)."""
    s_count, b, t, _ = xs.shape
    x = xs
    for p in params:
        hidden = p["wh"].shape[-2]
        gi = jnp.einsum("sbtd,sedg->setbg", x, p["wi"]) + p["bi"][:, :, None, None]   # [S, 2, T, B, 3H]
        gi = jnp.stack([gi[:, 0], jnp.flip(gi[:, 1], 1)], 1).reshape(s_count * 2, t, b, -1)
        gi = jnp.swapaxes(gi, 0, 1)                                                       # [T, 2S, B, 3H]
        m = jnp.stack([mask.T, jnp.flip(mask.T, 0)], 1)                                  # [T, 2, B]
        m = jnp.tile(m, (1, s_count, 1))[..., None]                                      # [T, 2S, B, 1]
        wh = p["wh"].reshape(s_count * 2, hidden, -1)
        bh = p["bh"].reshape(s_count * 2, 1, -1)

        def step(h, inp):
            git, mt = inp
            gh = jnp.einsum("kbh,khg->kbg", h, wh) + bh
            h = jnp.where(mt, _gates(git, gh, h), h)
            return h, h

        _, ys = jax.lax.scan(step, jnp.zeros((s_count * 2, b, hidden), x.dtype), (gi, m))
        ys = ys.reshape(t, s_count, 2, b, hidden)
        fwd, bwd = ys[:, :, 0], jnp.flip(ys[:, :, 1], 0)                                 # [T, S, B, H]
        x = jnp.transpose(jnp.concatenate([fwd, bwd], -1), (1, 2, 0, 3))                # [S, B, T, 2H]
    return x


# ----------------------------------------------------------------------------------------------------
# Drop-in replacements for two methods of the project's model, measured by the benchmarks without
# editing mister_jax: same parameter names, shapes and initialisers, same outputs.


def flip_hold_gru_call(self, x, mask):
    """`mister_jax.gru.BidirectionalGRU.__call__` without gathers: the backward streams are `jnp.flip`ped
    over the whole padded length, and every stream holds its state at a padded step. Padding sits at
    the end of each row, so a flipped row starts with padding; the state stays zero until the row's
    last real utterance, exactly as `reverse_within_length` would start it.

    Args: x [M, B, T, W], mask bool [B, T]. Returns [M, B, T, 2H].
    """
    import flax.linen as nn  # noqa: F401  (the method runs inside the flax module)

    num_modalities, _, _, width = x.shape
    hidden, streams = self.hidden, 2 * x.shape[0]
    bound = 1.0 / hidden ** 0.5
    dtype = self.dtype

    def param(name, shape):
        return self.param(name, lambda key, s: jax.random.uniform(key, s, jnp.float32, -bound, bound), shape)

    hold = jnp.stack([mask, jnp.flip(mask, 1)])                                     # [2, B, T]
    hold = jnp.tile(hold, (num_modalities, 1, 1)).transpose(2, 0, 1)[..., None]      # [T, G, B, 1]
    for layer in range(self.layers):
        w_ih = param(f"w_ih_{layer}", (streams, width, 3 * hidden))
        b_ih = param(f"b_ih_{layer}", (streams, 3 * hidden))
        w_hh = param(f"w_hh_{layer}", (streams, hidden, 3 * hidden))
        b_hh = param(f"b_hh_{layer}", (streams, 3 * hidden))
        x = jnp.where(mask[None, :, :, None], x, 0.0)
        both = jnp.stack([x, jnp.flip(x, 2)], axis=1).reshape((streams,) + x.shape[1:])
        x_proj = jnp.einsum("gbti,gik->tgbk", both.astype(dtype), w_ih.astype(dtype),
                            preferred_element_type=jnp.float32) + b_ih[None, :, None]
        w = w_hh.astype(dtype)

        def step(h, inputs, w=w, b_hh=b_hh):
            x_t, m_t = inputs
            gh = jnp.einsum("gbh,ghk->gbk", h.astype(dtype), w, preferred_element_type=jnp.float32) + b_hh[:, None]
            return (lambda new: (jnp.where(m_t, new, h),) * 2)(_gates(x_t, gh, h))

        _, hs = jax.lax.scan(step, jnp.zeros((streams,) + x.shape[1:2] + (hidden,), jnp.float32), (x_proj, hold))
        hs = jnp.transpose(hs, (1, 2, 0, 3)).reshape((num_modalities, 2) + x.shape[1:3] + (hidden,))
        x = jnp.concatenate([hs[:, 0], jnp.flip(hs[:, 1], 2)], axis=-1)
        width = 2 * hidden
    return x


def matmul_inception_call(self, x, mask):
    """`mister_jax.model.TemporalInception.__call__` as one matmul: every tap of the three kernels
    (1 + 3 + 5 = 9) in one x [B·T, D] × [D, 9F] product, then shifted sums per kernel ('same' zero
    padding), bias and ReLU. Parameters stay `conv{k}/kernel [k, D, F]` and `conv{k}/bias [F]`.
    """
    import flax.linen as nn

    x = jnp.where(mask[..., None], x, jnp.zeros((), x.dtype))
    kernels, biases = {}, {}
    for k in (1, 3, 5):
        conv = nn.Conv(self.features, (k,), padding="SAME", dtype=self.dtype, name=f"conv{k}")
        kernels[k], biases[k] = _conv_params(conv, x)
    taps = jnp.concatenate([kernels[k][j] for k in (1, 3, 5) for j in range(k)], axis=-1)    # [D, 9F]
    y = jnp.einsum("btd,df->btf", x.astype(self.dtype), taps.astype(self.dtype),
                   preferred_element_type=jnp.float32)
    y = y.reshape(y.shape[:2] + (9, self.features))
    t = x.shape[1]
    out, tap = 0.0, 0
    for k in (1, 3, 5):
        pad = k // 2
        padded = jnp.pad(y[:, :, tap:tap + k], ((0, 0), (pad, pad), (0, 0), (0, 0)))
        conv = sum(padded[:, j:j + t, j] for j in range(k))     # output t sums x[t + j - pad] W[j]
        out = out + jax.nn.relu(conv + biases[k])
        tap += k
    return out.astype(self.dtype)


def _conv_params(conv, x):
    """(kernel [k, D, F], bias [F]) of an `nn.Conv` submodule: one call on a [1, 1, D] zero row binds
    (or creates) its parameters, which are then read back."""
    conv(jnp.zeros((1, 1, x.shape[-1]), x.dtype))
    params = conv.variables["params"]
    return params["kernel"], params["bias"]


PATCHES = ("gru-flip", "inception-matmul")


def flip_hold_gru_class():
    """A `mister_jax.gru.BidirectionalGRU` subclass whose `__call__` is `flip_hold_gru_call`."""
    import flax.linen as nn

    from mister_jax import gru

    return type("FlipHoldGRU", (gru.BidirectionalGRU,), {"__call__": nn.compact(flip_hold_gru_call)})


def matmul_inception_class():
    """A `mister_jax.model.TemporalInception` subclass whose `__call__` is `matmul_inception_call`."""
    import flax.linen as nn

    from mister_jax import model

    return type("MatmulInception", (model.TemporalInception,), {"__call__": nn.compact(matmul_inception_call)})


def apply_patches(names):
    """Binds the drop-in modules to the names model.py instantiates (for benchmarking only)."""
    from mister_jax import model

    for name in names:
        if name == "gru-flip":
            model.BidirectionalGRU = flip_hold_gru_class()
        elif name == "inception-matmul":
            model.TemporalInception = matmul_inception_class()
        else:
            raise SystemExit(f"benchmarks: unknown patch {name!r}; use any of {', '.join(PATCHES)}.")
