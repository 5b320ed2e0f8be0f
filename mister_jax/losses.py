"""Training losses of MiSTER-E (Eq. 12–19; DESIGN §4) as pure functions.

Reduction: every per-utterance term is averaged over the real utterances of the batch (positions where
`mask` is True); the supervised contrastive term is averaged over all anchors of the batch that have
at least one positive (pairs formed within each conversation, or across the whole batch with
contrastive_scope="batch"). Padded positions never contribute to a value or a gradient, whatever they hold.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mister_jax.config import LossConfig

Array = jax.Array


def _masked_mean(values: Array, mask: Array) -> Array:
    """Mean of `values` over positions where `mask` is True (0.0 when there are none)."""
    mask = mask.astype(jnp.float32)
    return jnp.sum(jnp.where(mask > 0, values, 0.0)) / jnp.maximum(jnp.sum(mask), 1.0)


def focal_loss(logits: Array, labels: Array, mask: Array, gamma: float) -> Array:
    """Focal loss, FL = -(1 - p_y)^γ log p_y (Lin et al. 2017; MiSTER-E Eq. 19), mean over `mask`.

    γ = 0 gives the cross-entropy. Computed from log-softmax with 1 - p_y = -expm1(log p_y), so values
    and gradients stay finite as p_y → 1.

    Args:
      logits: [..., C] unnormalised scores.
      labels: int [...] class indices in [0, C); entries outside the mask are ignored.
      mask: bool [...] real positions.
      gamma: focusing parameter γ >= 0 (a Python number).

    Returns:
      Scalar, the mean focal loss over the masked positions.
    """
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    safe_labels = jnp.clip(labels, 0, logits.shape[-1] - 1)
    log_p = jnp.take_along_axis(log_probs, safe_labels[..., None], axis=-1)[..., 0]
    loss = -log_p
    if gamma:
        one_minus_p = -jnp.expm1(log_p)
        positive = one_minus_p > 0
        loss = loss * jnp.where(positive, jnp.power(jnp.where(positive, one_minus_p, 1.0), gamma), 0.0)
    return _masked_mean(loss, mask)


def _l2_normalize(x: Array, eps: float = 1e-12) -> Array:
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def _contrastive_anchor_terms(z: Array, labels: Array, valid: Array, temperature: float):
    """Per-anchor terms of Eq. 14 for the rows of z.

    Args:
      z: [N, F] representations (normalised here); labels int [N]; valid bool [N] real rows.
      temperature: τ.

    Returns:
      (terms [N], anchors bool [N]): terms[a] = -1/|P(a)| Σ_{p∈P(a)} log(exp(z_a·z_p/τ) /
      Σ_{q≠a, real} exp(z_a·z_q/τ)); anchors marks real rows with at least one positive.
    """
    z = _l2_normalize(jnp.where(valid[:, None], z.astype(jnp.float32), 0.0))
    similarity = z @ z.T / temperature
    others = valid[None, :] & valid[:, None] & ~jnp.eye(z.shape[0], dtype=bool)
    positives = others & (labels[:, None] == labels[None, :])
    num_positives = jnp.sum(positives, axis=1)
    anchors = num_positives > 0
    # Rows with no other real row get one dummy term so the log-sum-exp stays finite; they are no anchors.
    denominator_mask = others | (~jnp.any(others, axis=1, keepdims=True) & jnp.eye(z.shape[0], dtype=bool))
    log_denominator = jax.nn.logsumexp(jnp.where(denominator_mask, similarity, -jnp.inf), axis=1)
    log_prob = similarity - log_denominator[:, None]
    terms = -jnp.sum(jnp.where(positives, log_prob, 0.0), axis=1) / jnp.maximum(num_positives, 1)
    return jnp.where(anchors, terms, 0.0), anchors


def _stack_modalities(m_speech: Array, m_text: Array, labels: Array, mask: Array):
    """Z rows [M^s; M^t] of Eq. 13 with their labels and validity (2N rows)."""
    z = jnp.concatenate([m_speech, m_text], axis=0)
    return z, jnp.concatenate([labels, labels]), jnp.concatenate([mask, mask]).astype(bool)


def supervised_contrastive_loss(
    m_speech: Array, m_text: Array, labels: Array, mask: Array, temperature: float
) -> Array:
    """Supervised contrastive loss of one conversation (Khosla et al. 2020; MiSTER-E Eq. 13–14).

    Z = L2-normalised [M^s; M^t] (2T rows). For each anchor a, the positives P(a) are the other real
    rows with the same label and the denominator runs over all real rows q ≠ a. Anchors without
    positives contribute nothing; padded rows are neither anchors, positives nor negatives.

    Args:
      m_speech, m_text: [T, F] fused representations M^s, M^t.
      labels: int [T].
      mask: bool [T] real utterances.
      temperature: τ > 0.

    Returns:
      Scalar, the mean of the per-anchor terms over real anchors with at least one positive (0.0 when
      there is none).
    """
    terms, anchors = _contrastive_anchor_terms(*_stack_modalities(m_speech, m_text, labels, mask), temperature)
    return jnp.sum(terms) / jnp.maximum(jnp.sum(anchors), 1)


def supervised_contrastive_loss_conversations(
    m_speech: Array, m_text: Array, labels: Array, mask: Array, temperature: float
) -> Array:
    """Eq. 14 within each conversation of a batch, averaged over all anchors of the batch.

    Args: m_speech, m_text [B, T, F]; labels int [B, T]; mask bool [B, T]; temperature τ.

    Returns:
      Scalar: Σ over conversations of their anchor terms / number of anchors (anchors as in
      `supervised_contrastive_loss`; 0.0 when the batch has none).
    """
    per_conversation = jax.vmap(
        lambda s, t, y, m: _contrastive_anchor_terms(*_stack_modalities(s, t, y, m), temperature)
    )
    terms, anchors = per_conversation(m_speech, m_text, labels, mask)
    return jnp.sum(terms) / jnp.maximum(jnp.sum(anchors), 1)


def supervised_contrastive_loss_batch(
    m_speech: Array, m_text: Array, labels: Array, mask: Array, temperature: float
) -> Array:
    """Eq. 14 with all conversations of the batch pooled into one Z (the authors' code).

    Args: m_speech, m_text [B, T, F]; labels int [B, T]; mask bool [B, T]; temperature τ.

    Returns:
      Scalar, as `supervised_contrastive_loss` on the 2·B·T pooled rows.
    """
    flat = lambda x: x.reshape((-1,) + x.shape[2:])
    return supervised_contrastive_loss(flat(m_speech), flat(m_text), flat(labels), flat(mask), temperature)


def kl_consistency(logits_multimodal: Array, logits_speech: Array, logits_text: Array, mask: Array) -> Array:
    """KL consistency of the experts (MiSTER-E Eq. 17): KL(p^m ‖ p^s) + KL(p^m ‖ p^t), mean over `mask`.

    Directional: the multimodal expert's distribution p^m is the reference.

    Args:
      logits_multimodal, logits_speech, logits_text: [..., C].
      mask: bool [...].

    Returns:
      Scalar.
    """
    log_m, log_s, log_t = (
        jax.nn.log_softmax(x.astype(jnp.float32), axis=-1) for x in (logits_multimodal, logits_speech, logits_text)
    )
    p_m = jnp.exp(log_m)
    kl = jnp.sum(p_m * (2.0 * log_m - log_s - log_t), axis=-1)
    return _masked_mean(kl, mask)


def symmetric_kl_consistency(logits_multimodal: Array, logits_speech: Array, logits_text: Array, mask: Array) -> Array:
    """Symmetric KL consistency over the three pairs of experts, the authors' public code's form of Eq. 17:
    (1/3) Σ_{(p, q)} [KL(p ‖ q) + KL(q ‖ p)] over (s, t), (s, m), (t, m), mean over `mask`.

    The authors sum over every position of the padded batch and divide by the batch size; here each
    utterance's term is averaged over real utterances, like every other loss (module docstring).

    Args:
      logits_multimodal, logits_speech, logits_text: [..., C].
      mask: bool [...].

    Returns:
      Scalar.
    """
    logs = [jax.nn.log_softmax(x.astype(jnp.float32), axis=-1) for x in (logits_speech, logits_text, logits_multimodal)]
    pairs = [(0, 1), (0, 2), (1, 2)]
    # KL(p ‖ q) + KL(q ‖ p) = Σ_c (p_c - q_c)(log p_c - log q_c)
    kl = sum(jnp.sum((jnp.exp(logs[i]) - jnp.exp(logs[j])) * (logs[i] - logs[j]), axis=-1) for i, j in pairs)
    return _masked_mean(kl / len(pairs), mask)


_EXPERT_FIELDS = ("speech_logits", "text_logits", "multimodal_logits", "m_speech", "m_text")


def total_loss(outputs, labels: Array, mask: Array, loss_cfg: LossConfig, variant: str):
    """L_tot = L_CAN + L_multi + L_moe (Eq. 18) for `mister_jax.model.ModelOutputs`.

    L_CAN = FL(ŷ^s) + FL(ŷ^t) (Eq. 12), L_multi = FL(ŷ^m) + λ L_con (Eq. 15), L_moe = FL(ŷ) + α L_KL
    (Eq. 16). Per variant:
      mister-e, feat-moe: all terms.
      no-loss-moe: FL(ŷ) only (the experts are trained through the gate alone).
      monolithic: FL(ŷ) + λ L_con (no expert heads, no KL).
      text-only: FL(ŷ).
    Positions with label -1 (unlabelled) are treated as padding.

    Args:
      outputs: ModelOutputs with [B, T, C] logits and [B, T, Hf] fused representations.
      labels: int [B, T].
      mask: bool [B, T].
      loss_cfg: LossConfig.
      variant: ModelConfig.variant.

    Returns:
      (loss, terms): the scalar L_tot and a dict of its named scalar terms.
    """
    needed = {"mister-e": _EXPERT_FIELDS, "feat-moe": _EXPERT_FIELDS, "monolithic": ("m_speech", "m_text")}
    missing = [name for name in needed.get(variant, ()) if getattr(outputs, name) is None]
    if missing:
        raise ValueError(
            f"mister_jax/losses.py: variant {variant!r} needs outputs.{', '.join(missing)}, which "
            "the model did not produce; pass the variant the model was built with "
            "(ModelConfig.variant)."
        )
    mask = mask.astype(bool) & (labels >= 0)
    focal = lambda logits: focal_loss(logits, labels, mask, loss_cfg.gamma)
    terms = {"focal_moe": focal(outputs.logits)}
    if variant in ("mister-e", "feat-moe", "monolithic"):
        contrastive = (
            supervised_contrastive_loss_batch
            if loss_cfg.contrastive_scope == "batch"
            else supervised_contrastive_loss_conversations
        )
        terms["contrastive"] = contrastive(outputs.m_speech, outputs.m_text, labels, mask, loss_cfg.temperature)
    if variant in ("mister-e", "feat-moe"):
        terms["focal_speech"] = focal(outputs.speech_logits)
        terms["focal_text"] = focal(outputs.text_logits)
        terms["focal_multimodal"] = focal(outputs.multimodal_logits)
        kl = symmetric_kl_consistency if loss_cfg.kl_form == "symmetric" else kl_consistency
        terms["kl"] = kl(outputs.multimodal_logits, outputs.speech_logits, outputs.text_logits, mask)
        terms["can"] = terms["focal_speech"] + terms["focal_text"]
        terms["multi"] = terms["focal_multimodal"] + loss_cfg.lambda_con * terms["contrastive"]
        terms["moe"] = terms["focal_moe"] + loss_cfg.alpha_kl * terms["kl"]
        loss = terms["can"] + terms["multi"] + terms["moe"]
    elif variant == "monolithic":
        loss = terms["focal_moe"] + loss_cfg.lambda_con * terms["contrastive"]
    elif variant in ("no-loss-moe", "text-only"):
        loss = terms["focal_moe"]
    else:
        raise ValueError(
            f"mister_jax/losses.py: unknown variant {variant!r}; use one of mister-e, feat-moe, "
            "no-loss-moe, monolithic, text-only."
        )
    terms["total"] = loss
    return loss, terms
