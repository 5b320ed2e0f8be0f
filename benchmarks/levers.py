"""The GRU recurrence, the largest cost of a MiSTER-E step, written three ways in JAX for the profile.

- naive:   one `lax.scan` per (modality, direction, layer); the cell does x W_i + h W_h each step
           (what `flax.linen.RNN(GRUCell)` does).
- hoisted: x W_i for every time step as one large matmul before the scan; the scan does only h W_h.
- fused:   hoisted, and the four recurrences of a layer (speech/text × forward/backward) stepped
           together in one scan as one batched matmul [4, B, H] × [4, H, 3H].
All three compute the same function (PyTorch GRU equations) and are differentiated by JAX itself;
`benchmarks/profile_step.py` times them against `mister_jax.ops.gru`, which is `fused` with a
hand-written backward pass and all-padding steps skipped.
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
        scale = hidden**-0.5
        params.append(
            {
                "wi": jax.random.uniform(k1, (streams, 2, d, 3 * hidden), minval=-scale, maxval=scale),
                "wh": jax.random.uniform(k2, (streams, 2, hidden, 3 * hidden), minval=-scale, maxval=scale),
                "bi": jnp.zeros((streams, 2, 3 * hidden)),
                "bh": jnp.zeros((streams, 2, 3 * hidden)),
            }
        )
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
        gi = jnp.einsum("sbtd,sedg->setbg", x, p["wi"]) + p["bi"][:, :, None, None]  # [S, 2, T, B, 3H]
        gi = jnp.stack([gi[:, 0], jnp.flip(gi[:, 1], 1)], 1).reshape(s_count * 2, t, b, -1)
        gi = jnp.swapaxes(gi, 0, 1)  # [T, 2S, B, 3H]
        m = jnp.stack([mask.T, jnp.flip(mask.T, 0)], 1)  # [T, 2, B]
        m = jnp.tile(m, (1, s_count, 1))[..., None]  # [T, 2S, B, 1]
        wh = p["wh"].reshape(s_count * 2, hidden, -1)
        bh = p["bh"].reshape(s_count * 2, 1, -1)

        def step(h, inp):
            git, mt = inp
            gh = jnp.einsum("kbh,khg->kbg", h, wh) + bh
            h = jnp.where(mt, _gates(git, gh, h), h)
            return h, h

        _, ys = jax.lax.scan(step, jnp.zeros((s_count * 2, b, hidden), x.dtype), (gi, m))
        ys = ys.reshape(t, s_count, 2, b, hidden)
        fwd, bwd = ys[:, :, 0], jnp.flip(ys[:, :, 1], 0)  # [T, S, B, H]
        x = jnp.transpose(jnp.concatenate([fwd, bwd], -1), (1, 2, 0, 3))  # [S, B, T, 2H]
    return x
