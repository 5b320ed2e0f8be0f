"""Tests of mister_jax.ops.gru: the fused bidirectional GRU against a NumPy loop and against its plain
`lax.scan` reference, outputs and gradients, and the hand-written gradient of one layer."""

import jax
import jax.numpy as jnp
import numpy as np

from mister_jax.ops.forward_gru import ForwardGRU, forward_gru_reference
from mister_jax.ops.gru import BidirectionalGRU, bidirectional_gru_reference, gru_layer, reverse_conversations

# XLA:CPU compiles these small programs faster with the classic fusion emitters and without LLVM's
# expensive passes; the results are the same.
FAST_COMPILE = {
    "xla_cpu_use_fusion_emitters": False,
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True,
}


def _jit(fn, **kw):
    return jax.jit(fn, compiler_options=FAST_COMPILE, **kw)


def _case(modalities=2, hidden=3, layers=2, lengths=(5, 3, 0), steps=7, seed=0):
    """(gru, params, x [M, B, T, 2H], mask [B, T]): T > the longest conversation, and an empty row."""
    x = np.random.default_rng(seed).normal(size=(modalities, len(lengths), steps, 2 * hidden)).astype(np.float32)
    mask = np.arange(steps)[None, :] < np.array(lengths)[:, None]
    gru = BidirectionalGRU(hidden, layers)
    params = _jit(gru.init)(jax.random.key(seed), x, mask)["params"]
    return gru, params, x, mask


def _gru_numpy(x, lengths, params, hidden):
    """One bidirectional GRU layer by explicit loops; backward runs from each sequence's last real step."""
    w_ih, b_ih, w_hh, b_hh = (np.asarray(params[f"{n}_0"], np.float64) for n in ("w_ih", "b_ih", "w_hh", "b_hh"))
    out = np.zeros(x.shape[:2] + (2 * hidden,))
    for b, n in enumerate(lengths):
        for direction, steps in enumerate((range(n), reversed(range(n)))):
            h = np.zeros(hidden)
            for t in steps:
                gx = x[b, t] @ w_ih[direction] + b_ih[direction]
                gh = h @ w_hh[direction] + b_hh[direction]
                r = 1 / (1 + np.exp(-(gx[:hidden] + gh[:hidden])))
                z = 1 / (1 + np.exp(-(gx[hidden : 2 * hidden] + gh[hidden : 2 * hidden])))
                c = np.tanh(gx[2 * hidden :] + r * gh[2 * hidden :])
                h = (1 - z) * c + z * h
                out[b, t, direction * hidden : (direction + 1) * hidden] = h
    return out


def test_bidirectional_gru_matches_numpy_loop():
    # T = 7 > the longest conversation: the last two steps are padding in every row and are skipped.
    hidden, lengths = 3, (5, 3)
    gru, params, x, mask = _case(modalities=1, hidden=hidden, layers=1, lengths=lengths)
    y = _jit(gru.apply)({"params": params}, x, mask)
    expected = _gru_numpy(x[0], lengths, params, hidden)
    np.testing.assert_allclose(np.where(mask[..., None], y[0], 0), expected, rtol=1e-5, atol=1e-6)


def test_reference_matches_numpy_loop():
    hidden, lengths = 3, (5, 3)
    _, params, x, mask = _case(modalities=1, hidden=hidden, layers=1, lengths=lengths)
    y = _jit(bidirectional_gru_reference, static_argnums=3)(params, x, mask, 1)
    expected = _gru_numpy(x[0], lengths, params, hidden)
    np.testing.assert_allclose(np.where(mask[..., None], y[0], 0), expected, rtol=1e-5, atol=1e-6)


def test_outputs_equal_the_reference_at_real_utterances():
    gru, params, x, mask = _case()
    fused = _jit(gru.apply)({"params": params}, x, mask)
    plain = _jit(bidirectional_gru_reference, static_argnums=3)(params, x, mask, 2)
    np.testing.assert_allclose(fused[:, mask], plain[:, mask], rtol=1e-5, atol=1e-6)


def test_gradients_equal_the_reference():
    # The loss reads real utterances only, as the model does (it zeroes the CANs' padded outputs).
    gru, params, x, mask = _case()
    target = np.random.default_rng(1).normal(size=x.shape).astype(np.float32) * mask[None, :, :, None]

    def gradients(forward):
        loss = lambda p, x: jnp.sum(forward(p, x) * target)
        return _jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)

    (value, grads), (expected_value, expected_grads) = (
        gradients(lambda p, x: gru.apply({"params": p}, x, mask)),
        gradients(lambda p, x: bidirectional_gru_reference(p, x, mask, 2)),
    )
    np.testing.assert_allclose(value, expected_value, rtol=1e-5)
    for (path, got), expected in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(expected_grads)):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))


def _plain_gru_layer(x, hold, w_ih, b_ih, w_hh, b_hh):
    """`gru_layer` as an input projection and a plain `lax.scan`, differentiated by JAX itself."""
    x_proj = jnp.einsum("gbti,gik->tgbk", x, w_ih) + b_ih[None, :, None]

    def step(h, inputs):
        x_t, real_t = inputs
        gh = jnp.einsum("gbh,ghk->gbk", h, w_hh) + b_hh[:, None]
        xr, xz, xn = jnp.split(x_t, 3, axis=-1)
        hr, hz, hn = jnp.split(gh, 3, axis=-1)
        r, z = jax.nn.sigmoid(xr + hr), jax.nn.sigmoid(xz + hz)
        h = jnp.where(real_t, (1 - z) * jnp.tanh(xn + r * hn) + z * h, h)
        return h, h

    return jax.lax.scan(step, jnp.zeros(x_proj.shape[1:3] + (w_hh.shape[1],)), (x_proj, hold))[1]


def test_gru_layer_hand_written_gradient_matches_autodiff():
    # Streams with different lengths, a row that is all padding, and trailing all-padding steps.
    rng = np.random.default_rng(3)
    steps, streams, batch, width, hidden = 6, 2, 3, 5, 4
    normal = lambda *shape, scale=1.0: (scale * rng.normal(size=shape)).astype(np.float32)
    x = normal(streams, batch, steps, width)
    lengths = np.array([[4, 1, 0], [2, 4, 3]])
    hold = (np.arange(steps)[:, None, None] < lengths[None])[..., None]
    weights = (
        normal(streams, width, 3 * hidden, scale=0.5),
        normal(streams, 3 * hidden, scale=0.5),
        normal(streams, hidden, 3 * hidden, scale=0.5),
        normal(streams, 3 * hidden, scale=0.5),
    )
    target = normal(steps, streams, batch, hidden)

    def gradients(layer):
        loss = lambda x, *w: jnp.sum(layer(x, *w) * target)
        return _jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))(x, *weights)

    # gru_layer is feature-major ([T, G, 1, B] hold, [T, G, H, B] states); the reference is row-major.
    feature_major = lambda x, *w: jnp.swapaxes(gru_layer(x, np.swapaxes(hold, 2, 3), *w), 2, 3)
    plain = lambda x, *w: _plain_gru_layer(x, hold, *w)
    (value, grads), (expected_value, expected_grads) = gradients(feature_major), gradients(plain)
    np.testing.assert_allclose(value, expected_value, rtol=1e-5)
    for got, expected in zip(grads, expected_grads):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_reverse_conversations_reverses_the_first_length_steps_and_the_tail_separately():
    x = np.arange(7)
    np.testing.assert_array_equal(reverse_conversations(x, 5, axis=0), [4, 3, 2, 1, 0, 6, 5])
    np.testing.assert_array_equal(reverse_conversations(reverse_conversations(x, 5, axis=0), 5, axis=0), x)


def _forward_case(modalities=2, hidden=3, layers=2, lengths=(5, 3, 0), steps=7, width=4, seed=0):
    """(gru, params, x [M, B, T, I], mask [B, T]) of a `ForwardGRU`."""
    x = np.random.default_rng(seed).normal(size=(modalities, len(lengths), steps, width)).astype(np.float32)
    mask = np.arange(steps)[None, :] < np.array(lengths)[:, None]
    gru = ForwardGRU(hidden, layers)
    return gru, _jit(gru.init)(jax.random.key(seed), x, mask)["params"], x, mask


def test_forward_gru_matches_the_forward_half_of_the_numpy_loop():
    hidden, lengths = 3, (5, 3)
    gru, params, x, mask = _forward_case(modalities=1, hidden=hidden, layers=1, lengths=lengths, width=2 * hidden)
    y = _jit(gru.apply)({"params": params}, x, mask)
    # The loop's direction 0 with these weights; its direction 1 gets unused copies.
    both = {name: np.concatenate([params[name]] * 2) for name in params}
    expected = _gru_numpy(x[0], lengths, both, hidden)[..., :hidden]
    np.testing.assert_allclose(np.where(mask[..., None], y[0], 0), expected, rtol=1e-5, atol=1e-6)


def test_forward_gru_outputs_and_gradients_equal_the_reference():
    gru, params, x, mask = _forward_case()
    target = np.random.default_rng(1).normal(size=x.shape[:3] + (3,)).astype(np.float32) * mask[None, :, :, None]

    def gradients(forward):
        loss = lambda p, x: jnp.sum(forward(p, x) * target)
        return _jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)

    (value, grads), (expected_value, expected_grads) = (
        gradients(lambda p, x: gru.apply({"params": p}, x, mask)),
        gradients(lambda p, x: forward_gru_reference(p, x, mask, 2)),
    )
    np.testing.assert_allclose(value, expected_value, rtol=1e-5)
    for (path, got), expected in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(expected_grads)):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))
