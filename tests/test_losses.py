"""Tests of mister_jax.losses against direct NumPy loops over the paper's equations."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mister_jax import losses
from mister_jax.config import LossConfig
from mister_jax.model import ModelOutputs

# XLA:CPU compiles these small programs ~3x faster with the classic fusion emitters and without LLVM's
# expensive passes; the results are the same.
_FAST_COMPILE = {
    "xla_cpu_use_fusion_emitters": False,
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True,
}

focal_loss = jax.jit(losses.focal_loss, static_argnums=3, compiler_options=_FAST_COMPILE)
supcon = jax.jit(losses.supervised_contrastive_loss, static_argnums=4, compiler_options=_FAST_COMPILE)
supcon_grad = jax.jit(
    jax.grad(losses.supervised_contrastive_loss, argnums=(0, 1)), static_argnums=4, compiler_options=_FAST_COMPILE
)
focal_grad = jax.jit(jax.grad(losses.focal_loss), static_argnums=3, compiler_options=_FAST_COMPILE)
supcon_batch = jax.jit(losses.supervised_contrastive_loss_batch, static_argnums=4, compiler_options=_FAST_COMPILE)
supcon_conversations = jax.jit(
    losses.supervised_contrastive_loss_conversations, static_argnums=4, compiler_options=_FAST_COMPILE
)
kl_consistency = jax.jit(losses.kl_consistency, compiler_options=_FAST_COMPILE)
symmetric_kl = jax.jit(losses.symmetric_kl_consistency, compiler_options=_FAST_COMPILE)


def _log_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _focal_numpy(logits, labels, mask, gamma):
    total, count = 0.0, 0
    for index in zip(*np.nonzero(mask)):
        log_p = _log_softmax(logits[index].astype(np.float64))[labels[index]]
        total += -((1.0 - np.exp(log_p)) ** gamma) * log_p
        count += 1
    return total / count


def _supcon_numpy(m_speech, m_text, labels, mask, temperature):
    """Eq. 13–14 by explicit loops over anchors, positives and the denominator."""
    z = np.concatenate([m_speech, m_text]).astype(np.float64)
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    y = np.concatenate([labels, labels])
    real = np.concatenate([mask, mask])
    per_anchor = []
    for a in range(len(z)):
        if not real[a]:
            continue
        positives = [p for p in range(len(z)) if p != a and real[p] and y[p] == y[a]]
        if not positives:
            continue
        denominator = sum(np.exp(z[a] @ z[q] / temperature) for q in range(len(z)) if q != a and real[q])
        per_anchor.append(-np.mean([np.log(np.exp(z[a] @ z[p] / temperature) / denominator) for p in positives]))
    return np.mean(per_anchor) if per_anchor else 0.0


def _random_batch(seed, shape=(3, 7), classes=4):
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=3.0, size=shape + (classes,)).astype(np.float32)
    labels = rng.integers(0, classes, shape)
    mask = rng.random(shape) < 0.7
    mask[0, 0] = True
    return logits, labels, mask


def test_focal_loss_at_gamma_zero_is_cross_entropy():
    logits, labels, mask = _random_batch(0)
    expected = optax.softmax_cross_entropy_with_integer_labels(logits, labels)[mask].mean()
    np.testing.assert_allclose(focal_loss(logits, labels, mask, 0.0), expected, rtol=1e-6)


def test_focal_loss_matches_numpy_at_gamma_three():
    logits, labels, mask = _random_batch(1)
    np.testing.assert_allclose(
        focal_loss(logits, labels, mask, 3.0), _focal_numpy(logits, labels, mask, 3.0), rtol=1e-5
    )


def test_focal_loss_ignores_padded_positions():
    logits, labels, mask = _random_batch(2)
    garbage = np.where(mask[..., None], logits, 1e6).astype(np.float32)
    wrong_labels = np.where(mask, labels, 3)
    np.testing.assert_allclose(
        focal_loss(garbage, wrong_labels, mask, 3.0), focal_loss(logits, labels, mask, 3.0), rtol=1e-6
    )


@pytest.mark.parametrize("gamma", [0.0, 0.5, 3.0])
def test_focal_loss_gradient_is_finite_when_confident(gamma):
    logits = jnp.array([[100.0, 0.0, 0.0], [0.0, 100.0, 0.0]])
    grad = focal_grad(logits, jnp.array([0, 0]), jnp.array([True, True]), gamma)
    assert np.all(np.isfinite(grad))
    assert np.abs(grad[1]).max() > 0  # the wrong, confident prediction still gets a gradient


def _conversation(seed, length=9, real=7, classes=3, dim=5):
    rng = np.random.default_rng(seed)
    m_speech = rng.normal(size=(length, dim)).astype(np.float32)
    m_text = rng.normal(size=(length, dim)).astype(np.float32)
    labels = rng.integers(0, classes, length)
    labels[real - 1] = classes  # a label that occurs once per modality: its rows only pair across modalities
    mask = np.arange(length) < real
    return m_speech, m_text, labels, mask


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_supervised_contrastive_matches_numpy(seed):
    m_speech, m_text, labels, mask = _conversation(seed)
    np.testing.assert_allclose(
        supcon(m_speech, m_text, labels, mask, 1.0), _supcon_numpy(m_speech, m_text, labels, mask, 1.0), rtol=1e-5
    )


def test_supervised_contrastive_with_singleton_labels_across_rows():
    m_speech, m_text, labels, mask = _conversation(3, real=9)
    labels = np.arange(9)  # every label once: positives are only the other modality's row
    np.testing.assert_allclose(
        supcon(m_speech, m_text, labels, mask, 1.0), _supcon_numpy(m_speech, m_text, labels, mask, 1.0), rtol=1e-5
    )


def test_supervised_contrastive_temperature():
    m_speech, m_text, labels, mask = _conversation(4)
    value = supcon(m_speech, m_text, labels, mask, 0.5)
    np.testing.assert_allclose(value, _supcon_numpy(m_speech, m_text, labels, mask, 0.5), rtol=1e-5)
    assert not np.isclose(value, _supcon_numpy(m_speech, m_text, labels, mask, 1.0), rtol=1e-3)


def test_supervised_contrastive_ignores_padded_rows():
    m_speech, m_text, labels, mask = _conversation(5)
    rng = np.random.default_rng(0)
    garbage_s = np.where(mask[:, None], m_speech, rng.normal(scale=1e4, size=m_speech.shape)).astype(np.float32)
    garbage_t = np.where(mask[:, None], m_text, 0.0).astype(np.float32)  # zero rows must not give NaN
    np.testing.assert_allclose(
        supcon(garbage_s, garbage_t, labels, mask, 1.0), supcon(m_speech, m_text, labels, mask, 1.0), rtol=1e-6
    )
    for grad in supcon_grad(garbage_s, garbage_t, labels, mask, 1.0):
        assert np.all(np.isfinite(grad)) and np.all(grad[~mask] == 0)


def test_supervised_contrastive_without_real_rows_is_zero():
    # Every real utterance has a positive (its other modality's row), so only an empty mask has none.
    m_speech, m_text, labels, mask = _conversation(6)
    mask[:] = False
    assert supcon(m_speech, m_text, labels, mask, 1.0) == 0.0
    assert all(np.all(g == 0) for g in supcon_grad(m_speech, m_text, labels, mask, 1.0))


def test_supervised_contrastive_batch_scopes():
    conversations = [_conversation(seed) for seed in (7, 8)]
    m_speech, m_text, labels, mask = (np.stack(parts) for parts in zip(*conversations))
    pooled = supcon_batch(m_speech, m_text, labels, mask, 1.0)
    np.testing.assert_allclose(
        pooled,
        _supcon_numpy(m_speech.reshape(-1, 5), m_text.reshape(-1, 5), labels.reshape(-1), mask.reshape(-1), 1.0),
        rtol=1e-5,
    )
    per_conversation = supcon_conversations(m_speech, m_text, labels, mask, 1.0)
    # Both conversations have 2·7 anchors with a positive, so the anchor mean is the mean of the two.
    expected = np.mean([_supcon_numpy(*c, 1.0) for c in conversations])
    np.testing.assert_allclose(per_conversation, expected, rtol=1e-5)


def _kl_numpy(logits_m, logits_s, logits_t, mask):
    log_m, log_s, log_t = (_log_softmax(x.astype(np.float64)) for x in (logits_m, logits_s, logits_t))
    kl = (np.exp(log_m) * (log_m - log_s)).sum(-1) + (np.exp(log_m) * (log_m - log_t)).sum(-1)
    return kl[mask].mean()


def test_kl_consistency_matches_numpy():
    (logits_m, labels, mask), (logits_s, _, _), (logits_t, _, _) = (_random_batch(s) for s in (10, 11, 12))
    np.testing.assert_allclose(
        kl_consistency(logits_m, logits_s, logits_t, mask), _kl_numpy(logits_m, logits_s, logits_t, mask), rtol=1e-5
    )


def test_kl_consistency_is_directional():
    logits_m, _, mask = _random_batch(13)
    logits_s, _, _ = _random_batch(14)
    forward = kl_consistency(logits_m, logits_s, logits_s, mask)
    backward = kl_consistency(logits_s, logits_m, logits_m, mask)
    assert not np.isclose(forward, backward, rtol=1e-3)


def test_kl_consistency_zero_when_experts_agree():
    logits, _, mask = _random_batch(15)
    shifted = logits + 5.0  # same distributions
    np.testing.assert_allclose(kl_consistency(logits, shifted, logits, mask), 0.0, atol=1e-6)


def test_symmetric_kl_consistency_matches_pairwise_kl_divergences():
    (logits_m, _, mask), (logits_s, _, _), (logits_t, _, _) = (_random_batch(s) for s in (17, 18, 19))
    logs = [_log_softmax(x.astype(np.float64)) for x in (logits_s, logits_t, logits_m)]
    kl = lambda a, b: (np.exp(logs[a]) * (logs[a] - logs[b])).sum(-1)  # KL(p_a ‖ p_b)
    per_utterance = sum(kl(i, j) + kl(j, i) for i, j in ((0, 1), (0, 2), (1, 2))) / 3
    np.testing.assert_allclose(symmetric_kl(logits_m, logits_s, logits_t, mask), per_utterance[mask].mean(), rtol=1e-5)


def test_symmetric_kl_consistency_ignores_padding():
    (logits_m, _, mask), (logits_s, _, _), (logits_t, _, _) = (_random_batch(s) for s in (20, 21, 22))
    garbage = np.where(mask[..., None], 0.0, 1e3).astype(np.float32)
    np.testing.assert_allclose(
        symmetric_kl(logits_m + garbage, logits_s - garbage, logits_t, mask),
        symmetric_kl(logits_m, logits_s, logits_t, mask),
        rtol=1e-6,
    )


def test_total_loss_names_missing_outputs_for_the_variant():
    logits, labels, mask = _random_batch(16)
    with pytest.raises(ValueError, match="ModelConfig.variant"):
        losses.total_loss(ModelOutputs(logits=logits), labels, mask, LossConfig(), "mister-e")
