"""Tests of mister_jax.model: padding invariance and training of every variant, dropout, bfloat16, the
parameter count and initialisation, the temporal inception (Eq. 3). The kernels' own tests: test_ops_*.py."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mister_jax import losses
from mister_jax.config import VARIANTS, LossConfig, ModelConfig
from mister_jax.model import MisterE, TemporalInception
from mister_jax.ops.temporal_conv import temporal_conv_reference
from mister_jax.params import count_params, init_params, param_shapes

# XLA:CPU compiles these small programs faster with the classic fusion emitters and without LLVM's
# expensive passes; the results are the same.
_FAST_COMPILE = {
    "xla_cpu_use_fusion_emitters": False,
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True,
}

TINY = dict(
    speech_dim=12,
    text_dim=12,
    num_classes=3,
    can_hidden=8,
    gru_layers=2,
    fusion_dim=16,
    fusion_layers=2,
    attention_dim=8,
    attention_heads=2,
)
OUTPUT_FIELDS = ("logits", "speech_logits", "text_logits", "multimodal_logits", "gate", "m_speech", "m_text")


@functools.lru_cache(maxsize=None)
def _model(variant):
    """(config, params, evaluate) for a tiny model; evaluate is jitted once per input shape."""
    cfg = ModelConfig(variant=variant, **TINY)
    loss_cfg = LossConfig()

    def loss_fn(params, speech, text, mask, labels, loss_mask):
        outputs = MisterE(cfg).apply({"params": params}, speech, text, mask, deterministic=True)
        loss, terms = losses.total_loss(outputs, labels, loss_mask, loss_cfg, variant)
        return loss, (outputs, terms)

    def evaluate(params, speech, text, mask, labels, loss_mask, param_grads=True):
        argnums = (0, 1, 2) if param_grads else (1, 2)
        grad_fn = jax.value_and_grad(loss_fn, argnums=argnums, has_aux=True)
        (loss, (outputs, terms)), grads = grad_fn(params, speech, text, mask, labels, loss_mask)
        result = dict(loss=loss, outputs=outputs, terms=terms, g_speech=grads[-2], g_text=grads[-1])
        return dict(result, g_params=grads[0]) if param_grads else result

    evaluate = jax.jit(evaluate, static_argnames="param_grads", compiler_options=_FAST_COMPILE)
    return cfg, init_params(cfg, jax.random.key(0)), evaluate


def _padding_case(seed=0, length=4, padded_length=7):
    """A conversation alone, and a batch holding it padded with garbage, a longer one and an empty one."""
    rng = np.random.default_rng(seed)
    dims = (TINY["speech_dim"], TINY["text_dim"])
    alone = [rng.normal(size=(1, length, d)).astype(np.float32) for d in dims]
    labels = rng.integers(0, TINY["num_classes"], (1, length))
    batch = [rng.normal(scale=1e3, size=(3, padded_length, d)).astype(np.float32) for d in dims]
    for x, a in zip(batch, alone):
        x[0, :length] = a[0]
        x[1] = rng.normal(size=x[1].shape)
    batch_labels = rng.integers(-1, 3, (3, padded_length))
    batch_labels[0, :length] = labels[0]
    batch_mask = np.arange(padded_length)[None, :] < np.array([[length], [padded_length], [0]])
    loss_mask = batch_mask & (np.arange(3)[:, None] == 0)
    alone_mask = np.ones((1, length), bool)
    alone_case = (alone[0], alone[1], alone_mask, labels, alone_mask)
    return alone_case, (batch[0], batch[1], batch_mask, batch_labels, loss_mask)


@pytest.mark.parametrize("variant", VARIANTS)
def test_padding_and_batching_do_not_change_a_conversation(variant):
    _, params, evaluate = _model(variant)
    alone_inputs, batch_inputs = _padding_case()
    alone = evaluate(params, *alone_inputs, param_grads=False)
    batched = evaluate(params, *batch_inputs)
    n = alone_inputs[0].shape[1]
    close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-5)
    for field in OUTPUT_FIELDS:
        a, b = getattr(alone["outputs"], field), getattr(batched["outputs"], field)
        assert (a is None) == (b is None), field
        if a is not None:
            assert np.all(np.isfinite(b)), f"{field} not finite at padded positions"
            close(b[0, :n], a[0], err_msg=field)
    close(batched["loss"], alone["loss"])
    assert set(batched["terms"]) == set(alone["terms"])
    for name in alone["terms"]:
        close(batched["terms"][name], alone["terms"][name], err_msg=name)
    for name in ("g_speech", "g_text"):
        if variant == "text-only" and name == "g_speech":
            continue
        close(batched[name][0, :n], alone[name][0], err_msg=name)
        assert np.all(batched[name][0, n:] == 0) and np.all(batched[name][2] == 0), name


@pytest.mark.parametrize("variant", VARIANTS)
def test_training_steps_reduce_the_loss(variant):
    _, params, evaluate = _model(variant)
    _, (speech, text, mask, labels, _) = _padding_case(seed=1)
    optimizer = optax.adam(3e-2)
    state = optimizer.init(params)

    @functools.partial(jax.jit, compiler_options=_FAST_COMPILE)
    def update(grads, state, params):
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    history = []
    for _ in range(8):
        result = evaluate(params, speech, text, mask, labels, mask)
        history.append(float(result["loss"]))
        params, state = update(result["g_params"], state, params)
    assert all(np.isfinite(history)) and history[-1] < 0.9 * history[0], history


def test_dropout_is_active_only_when_not_deterministic():
    cfg, params, _ = _model("text-only")
    speech, text, mask, _, _ = _padding_case()[0]
    apply = jax.jit(
        lambda key, deterministic: (
            MisterE(cfg)
            .apply({"params": params}, speech, text, mask, deterministic=deterministic, rngs={"dropout": key})
            .logits
        ),
        static_argnums=1,
        compiler_options=_FAST_COMPILE,
    )
    first, second = apply(jax.random.key(1), False), apply(jax.random.key(2), False)
    assert np.all(np.isfinite(first)) and not np.allclose(first, second)
    np.testing.assert_array_equal(apply(jax.random.key(1), True), apply(jax.random.key(2), True))


def test_bfloat16_compute_keeps_float32_params_and_outputs():
    cfg, params, _ = _model("mister-e")
    speech, text, mask, _, _ = _padding_case()[0]
    # Default compiler options: the runtime's dot kernels must accept the bfloat16 matmuls.
    apply = jax.jit(lambda c: MisterE(c).apply({"params": params}, speech, text, mask).logits, static_argnums=0)
    reference, low_precision = apply(cfg), apply(ModelConfig(variant="mister-e", dtype="bfloat16", **TINY))
    assert low_precision.dtype == jnp.float32
    np.testing.assert_allclose(low_precision, reference, atol=0.1)
    assert not np.array_equal(low_precision, reference)


def test_bfloat16_training_gradients_run_and_stay_close_to_float32():
    cfg, params, _ = _model("mister-e")
    speech, text, mask, labels, loss_mask = _padding_case()[1]

    def gradients(dtype):
        def loss_fn(params):
            outputs = MisterE(ModelConfig(variant="mister-e", dtype=dtype, **TINY)).apply(
                {"params": params}, speech, text, mask, deterministic=True
            )
            return losses.total_loss(outputs, labels, loss_mask, LossConfig(), "mister-e")[0]

        # Default compiler options: the runtime's dot kernels must accept every bfloat16 matmul of the
        # backward pass too (the GRU's input projections once fell back to one that does not).
        return jax.jit(jax.grad(loss_fn))(params)

    low_precision, reference = gradients("bfloat16"), gradients("float32")
    for got, expected in zip(jax.tree.leaves(low_precision), jax.tree.leaves(reference)):
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(got, expected, atol=0.05 * float(np.max(np.abs(expected))) + 1e-6)


def _paper_param_count(gate_params):
    """The MiSTER-E size at the paper's dimensions, layer by layer from Sec. 3 (weights + biases):
    2048-dim speech and text embeddings, 6 classes, CAN hidden 512 per direction with 3 GRU layers,
    fusion width 1024, 4 layers of attention at width 120."""
    dense = lambda i, o: i * o + o
    gru_direction = 3 * 512 * (1024 + 512) + 2 * 3 * 512  # W_ih, W_hh, b_ih, b_hh of torch.nn.GRU
    can = (
        sum(dense(2048 * k, 1024) for k in (1, 3, 5))  # temporal inception, Eq. 3
        + 3 * 2 * gru_direction  # bidirectional GRU, Eq. 4
        + dense(2048, 1024)
        + dense(1024, 6)
    )  # residual FC(E), classifier
    attention = 3 * dense(1024, 120) + dense(120, 1024)  # Q, K, V projections and the output projection
    layer = 4 * attention + 4 * 2 * 1024  # cross and self attention per modality, 4 LayerNorms
    multimodal = (
        2 * dense(2048, 1024)
        + 4 * layer  # FC_in, Eq. 5–8
        + 2 * dense(2048, 1024)  # FC_res
        + 2 * 2048
        + dense(2048, 1024)
        + dense(1024, 6)
    )  # LN, FC, FC (Eq. 9)
    return 2 * can + multimodal + gate_params


@pytest.mark.parametrize(
    "gate, gate_params, expected", [("fc", 18 * 3 + 3, 88_732_363), ("mlp", 18 * 10 + 10 + 10 * 3 + 3, 88_732_529)]
)
def test_parameter_count_at_paper_dims(gate, gate_params, expected):
    assert _paper_param_count(gate_params) == expected
    assert count_params(param_shapes(ModelConfig(gate=gate))) == expected


def _leaf_kind(path):
    """How `path` starts under PyTorch's initialisation: ("uniform", fan_in) or ("ones" | "zeros", None)."""
    names = [k.key for k in path]
    if names[-2] == "gru":
        return "uniform", TINY["can_hidden"]  # torch.nn.GRU: U(±1/√H)
    if "norm" in names[-2]:
        return ("ones" if names[-1] in ("scale", "scales") else "zeros"), None
    return "uniform", None


def test_pytorch_initialisation_draws_every_leaf_from_its_formula():
    cfg = ModelConfig(**TINY)
    params = init_params(cfg, jax.random.key(0))
    flat = {tuple(k.key for k in path): np.asarray(x) for path, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    for path, x in flat.items():
        kind, fan_in = _leaf_kind([jax.tree_util.DictKey(k) for k in path])
        if kind != "uniform":
            np.testing.assert_array_equal(x, 1.0 if kind == "ones" else 0.0, err_msg=str(path))
            continue
        if fan_in is None:  # a dense layer or convolution: fan-in from its weight's shape
            weight = flat[path[:-1] + ({"bias": "kernel", "biases": "kernels"}.get(path[-1], path[-1]),)]
            fan_in = weight.shape[0] * weight.shape[1] if path[-2].startswith("conv") else weight.shape[-2]
        bound = fan_in**-0.5
        assert np.abs(x).max() <= bound, path
        if x.size >= 200:  # U(±b) has max ≈ b and std b/√3
            assert np.abs(x).max() > 0.9 * bound, path
            assert abs(x.std() - bound / math.sqrt(3)) < 0.1 * bound / math.sqrt(3), path


def test_flax_initialisation_is_lecun_normal_with_zero_biases():
    cfg = ModelConfig(init="flax", **TINY)
    params = init_params(cfg, jax.random.key(0))
    kernel = np.asarray(params["can"]["text_inception"]["conv5"]["kernel"])  # fan_in = 12 · 5
    assert abs(kernel.std() * math.sqrt(5 * TINY["text_dim"]) - 1.0) < 0.1
    assert np.all(params["multimodal"]["classifier_hidden"]["bias"] == 0)
    assert np.all(params["multimodal"]["classifier_norm"]["scale"] == 1)


def test_init_params_has_the_module_structure():
    cfg, params, _ = _model("mister-e")
    shapes = param_shapes(cfg)
    assert jax.tree.map(lambda p: (p.shape, p.dtype), params) == jax.tree.map(lambda s: (s.shape, s.dtype), shapes)


def test_wrong_feature_dim_is_one_readable_error():
    cfg, params, _ = _model("mister-e")
    speech, text, mask, _, _ = _padding_case()[0]
    with pytest.raises(ValueError, match="speech_dim=12"):
        MisterE(cfg).apply({"params": params}, speech[..., :5], text, mask)


def test_temporal_inception_sums_the_relu_of_three_same_convolutions_of_the_zero_padded_input():
    # Eq. 3: kernels k = 1, 3, 5, each with ReLU, summed; padded rows count as zeros at the edges.
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 7, 5)).astype(np.float32)
    mask = np.arange(7)[None, :] < np.array([[7], [4]])
    module = TemporalInception(6)
    params = module.init(jax.random.key(0), x, mask)["params"]
    got = module.apply({"params": params}, x, mask)
    zeroed = np.where(mask[..., None], x, 0.0)
    want = sum(
        np.maximum(temporal_conv_reference(zeroed, params[f"conv{k}"]["kernel"], params[f"conv{k}"]["bias"]), 0)
        for k in (1, 3, 5)
    )
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
