"""The causal mode (`--set causal=true`, #22): a prediction sees its utterance and the ones before it,
never a later one, and the model still learns. The kernels' causal forms: tests/test_ops_*.py."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mister_jax import losses
from mister_jax.config import LossConfig, ModelConfig
from mister_jax.configs import get_config
from mister_jax.configs.overrides import OverrideError, apply_overrides
from mister_jax.model import MisterE
from mister_jax.params import count_params, init_params, param_shapes

FAST_COMPILE = {
    "xla_cpu_use_fusion_emitters": False,
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True,
}
TINY = dict(
    speech_dim=12,
    text_dim=10,
    num_classes=3,
    can_hidden=8,
    gru_layers=2,
    fusion_dim=16,
    fusion_layers=1,
    attention_dim=8,
    attention_heads=2,
)
LENGTH = 9
PREFIXES = np.array([1, 3, 6, LENGTH])  # one conversation cut after 1, 3, 6 and all 9 utterances
PROBABILITIES = ("logits", "speech_logits", "text_logits", "multimodal_logits")


def _conversation(seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(LENGTH, TINY["speech_dim"])), rng.normal(size=(LENGTH, TINY["text_dim"]))


@functools.lru_cache(maxsize=None)
def _prefix_predictions(variant: str, causal: bool) -> dict:
    """Each prefix of one conversation as a row of a batch (garbage after it, masked), through the
    model: {field: [len(PREFIXES), T, ·]} of the probabilities and the gate."""
    cfg = ModelConfig(variant=variant, causal=causal, **TINY)
    speech, text = _conversation()
    rows = len(PREFIXES)
    mask = np.arange(LENGTH)[None, :] < PREFIXES[:, None]
    garbage = np.random.default_rng(1).normal(scale=1e3, size=(rows, LENGTH, 1))
    batch = [np.where(mask[..., None], x[None], garbage).astype(np.float32) for x in (speech, text)]

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def predict(params, speech, text, mask):
        out = MisterE(cfg).apply({"params": params}, speech, text, mask)
        fields = {f: jax.nn.softmax(getattr(out, f)) for f in PROBABILITIES if getattr(out, f) is not None}
        return fields if out.gate is None else {**fields, "gate": out.gate}

    return jax.device_get(predict(init_params(cfg, jax.random.key(0)), *batch, mask))


def _largest_change_of_an_earlier_prediction(predictions: dict) -> float:
    """max over prefixes, their utterances and the fields of |prediction in the prefix - in the whole|."""
    return max(
        float(np.abs(p[row, :n] - p[-1, :n]).max()) for p in predictions.values() for row, n in enumerate(PREFIXES)
    )


# mister-e holds every layer; monolithic feeds the CANs' outputs to the attention. The other variants
# rearrange the same layers; tests/test_stream.py holds each of them equal to its stream, which never
# reads an utterance before it arrives.
@pytest.mark.parametrize("variant", ["mister-e", "monolithic"])
def test_appending_utterances_never_changes_the_earlier_predictions(variant):
    assert _largest_change_of_an_earlier_prediction(_prefix_predictions(variant, True)) <= 1e-6


def test_the_bidirectional_model_fails_the_same_test():
    assert _largest_change_of_an_earlier_prediction(_prefix_predictions("mister-e", False)) > 1e-3


def test_a_prediction_has_zero_gradient_in_every_later_utterance_and_not_in_earlier_ones():
    # The Jacobian of utterance t's final logits with respect to utterance u's inputs: zero for u > t,
    # non-zero for u <= t (the GRU carries the whole past, beyond the convolutions' window).
    cfg = ModelConfig(causal=True, **TINY)
    params = init_params(cfg, jax.random.key(0))
    speech, text = (x[None].astype(np.float32) for x in _conversation(2))
    mask = np.ones((1, LENGTH), bool)
    logits = lambda s, t: MisterE(cfg).apply({"params": params}, s, t, mask).logits[0]  # [T, C]
    jacobians = jax.jit(jax.jacrev(logits, argnums=(0, 1)), compiler_options=FAST_COMPILE)(speech, text)
    for jacobian in jacobians:  # [T, C, 1, T, D]
        size = np.abs(np.asarray(jacobian)).sum(axis=(1, 2, 4))  # [t, u]
        later = np.triu(np.ones((LENGTH, LENGTH), bool), k=1)
        assert np.all(size[later] == 0.0)
        assert np.all(size[~later] > 0.0)


def test_set_causal_true_reaches_the_model_configuration():
    config = apply_overrides(get_config("demo"), ["causal=true"])
    assert config.model.causal and not get_config("demo").model.causal
    with pytest.raises(OverrideError, match="expected true or false"):
        apply_overrides(get_config("demo"), ["causal=sometimes"])


def test_parameter_count_at_paper_dims_with_forward_grus_of_width_h():
    # Sec. 3 at paper dims with the CANs causal: each forward GRU layer reads 2H = 1024 (the inception)
    # then H = 512, and the residual FC(E): 2048 → 512 and the classifier 512 → 6 follow the forward state.
    dense = lambda i, o: i * o + o
    gru_layer = lambda inputs: 3 * 512 * (inputs + 512) + 2 * 3 * 512
    can = sum(dense(2048 * k, 1024) for k in (1, 3, 5)) + gru_layer(1024) + 2 * gru_layer(512)
    can += dense(2048, 512) + dense(512, 6)
    attention = 3 * dense(1024, 120) + dense(120, 1024)
    layer = 4 * attention + 4 * 2 * 1024
    multimodal = 4 * dense(2048, 1024) + 4 * layer + 2 * 2048 + dense(2048, 1024) + dense(1024, 6)
    assert count_params(param_shapes(ModelConfig(causal=True))) == 2 * can + multimodal + 18 * 3 + 3


def test_training_steps_reduce_the_loss_of_the_causal_model():
    cfg = ModelConfig(causal=True, **TINY)
    rng = np.random.default_rng(3)
    speech, text = (rng.normal(size=(3, LENGTH, d)).astype(np.float32) for d in (TINY["speech_dim"], TINY["text_dim"]))
    labels = rng.integers(0, TINY["num_classes"], (3, LENGTH))
    mask = np.arange(LENGTH)[None, :] < np.array([[LENGTH], [5], [7]])
    optimizer = optax.adam(3e-2)

    def loss_fn(params):
        outputs = MisterE(cfg).apply({"params": params}, speech, text, mask, deterministic=True)
        return losses.total_loss(outputs, jnp.asarray(labels), mask, LossConfig(), cfg.variant)[0]

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def update(params, state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    params = init_params(cfg, jax.random.key(0))
    state = optimizer.init(params)
    history = []
    for _ in range(8):
        params, state, loss = update(params, state)
        history.append(float(loss))
    assert all(np.isfinite(history)) and history[-1] < 0.9 * history[0], history
