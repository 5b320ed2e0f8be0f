"""MiSTER-E: speech and text context addition networks, a multimodal network and a mixture-of-experts
gate (Dutta, Balaji, Ganapathy, Sec. 3; DESIGN §3).

    outputs = MisterE(cfg).apply({"params": params}, speech [B, T, Ds], text [B, T, Dt], mask bool [B, T],
                                 deterministic, rngs={"dropout": key})

Each mask row is True on a conversation's utterances and False after them (padding at the end).
Padded positions never influence real ones: inputs are zeroed there before any layer,
convolutions see zeros beyond a conversation's last utterance, the backward GRU starts at the last real
utterance, and attention ignores padded keys. Padded positions of the outputs hold finite values that
callers must ignore.

Causal mode (`ModelConfig.causal`, for live conversations): utterance t sees utterances 0..t only. The
convolutions read t - k + 1 .. t, the GRUs run forward (the CANs' representations are the forward state,
H wide, not 2H: FC(E): D → H, FC: H → C) and attention masks keys after its query; losses unchanged.

Variants (`ModelConfig.variant`):
  mister-e     speech CAN, text CAN and multimodal experts; the gate mixes their logits (Eq. 10–11).
  feat-moe     same experts; the gate mixes their projected representations before one classifier.
  no-loss-moe  the mister-e network; only the gated prediction is supervised (see losses.total_loss).
  monolithic   both CANs' contextual representations feed the multimodal network; no expert heads or gate.
  text-only    the text CAN alone (Sec. 5.3); `speech` may be None.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mister_jax.config import ModelConfig
from mister_jax.layers import Dense, StackedLayerNorm
from mister_jax.model_io import ModelOutputs, check_input, check_mask, zero_padding
from mister_jax.ops.attention import StackedMultiHeadAttention
from mister_jax.ops.dropout import Dropout
from mister_jax.ops.forward_gru import ForwardGRU
from mister_jax.ops.gru import BidirectionalGRU
from mister_jax.ops.temporal_conv import ConvWeights, temporal_conv

Array = jax.Array


class TemporalInception(nn.Module):
    """The temporal inception (Eq. 3): three 1-D convolutions over the utterance axis with kernels
    k = 1, 3, 5 ('same' padding, or causal: past and present only), each followed by ReLU, summed.
    Padded rows are zeroed first, so a conversation's edges see the same zeros as when alone. Each
    convolution is `mister_jax.ops.temporal_conv` (one matmul over its taps); its weights are `conv{k}`.

    Attributes:
      features: output width (2H).
      initialization: "torch" or "flax".
      dtype: compute dtype.
      causal: whether step t sees steps up to t only.
    """

    features: int
    initialization: str = "torch"
    dtype: Any = jnp.float32
    causal: bool = False

    @nn.compact
    def __call__(self, x: Array, mask: Array) -> Array:
        """Args: x [B, T, D], mask bool [B, T]. Returns [B, T, features]."""
        x = zero_padding(x, mask).astype(self.dtype)
        out = 0.0
        for k in (1, 3, 5):
            kernel, bias = ConvWeights(k, self.features, self.initialization, name=f"conv{k}")(x.shape[-1])
            out = out + nn.relu(temporal_conv(x, kernel, bias, self.dtype, self.causal))
        return out.astype(self.dtype)


class ContextAdditionNetworks(nn.Module):
    """The context addition networks (CAN, Eq. 3–4) of several modalities, one per modality with its own
    weights: temporal inception → L-layer bidirectional GRU, plus the residual projection FC(E): D → 2H,
    dropout, and (with `heads`) the classifier FC: 2H → C. The GRU recurrences of all modalities and
    directions are stepped together (see `mister_jax.ops.gru`; causal: `mister_jax.ops.forward_gru`).

    Attributes:
      config: the model configuration.
      modalities: names of the modalities, in the order of the inputs.
      heads: whether to add the per-modality classifiers.
    """

    config: ModelConfig
    modalities: tuple[str, ...]
    heads: bool = True

    @nn.compact
    def __call__(self, inputs: tuple[Array, ...], mask: Array, deterministic: bool):
        """Args: inputs, one [B, T, D_m] per modality; mask bool [B, T].

        Returns:
          (representations, logits): tuples over modalities of [B, T, 2H] (causal: [B, T, H]) contextual
          representations and [B, T, C] logits (logits is None without heads).
        """
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        inception = jnp.stack(
            [
                TemporalInception(2 * cfg.can_hidden, cfg.init, dtype, cfg.causal, name=f"{name}_inception")(x, mask)
                for name, x in zip(self.modalities, inputs)
            ]
        )
        gru = ForwardGRU if cfg.causal else BidirectionalGRU
        context = gru(cfg.can_hidden, cfg.gru_layers, dtype, name="gru")(inception, mask)
        width = context.shape[-1]
        representations, logits = [], []
        for name, x, h in zip(self.modalities, inputs, context):
            h = h + Dense(width, cfg.init, dtype, name=f"{name}_residual")(x)
            h = Dropout(cfg.can_dropout)(h, deterministic=deterministic)
            h = zero_padding(h, mask)
            representations.append(h)
            if self.heads:
                logits.append(Dense(cfg.num_classes, cfg.init, dtype, name=f"{name}_head")(h))
        return tuple(representations), (tuple(logits) if self.heads else None)


def _swap_streams(x: Array) -> Array:
    """x [2, ...] stacked as (speech, text) → (text, speech).

    Cross-attention (Eq. 5–6) lets speech query text and text query speech. With the two modalities
    stacked on the leading axis, swapping that axis gives every query stream the other modality as its
    keys and values, so both cross-attentions run as one stacked attention.
    """
    return x[::-1]


class CrossModalLayer(nn.Module):
    """One layer of the multimodal network (Eq. 5–8) on modality-stacked activations X [2, B, T, Hf]
    (0: speech, 1: text), each sub-layer with an identity residual and a LayerNorm:

        cross-attention (Eq. 5–6)  X^s ← LN(X^s + Drop(MHA(Q = X^s, K = V = X^t))), X^t likewise;
        self-attention (Eq. 7–8)   X^s ← LN(X^s + Drop(MHA(Q = K = V = X^s))),     X^t likewise.

    Drop is `fusion_dropout` on the sub-layer's output; inside MHA, `attention_dropout` acts on the
    attention probabilities (the authors' placement of the paper's "dropout 0.5 in the fusion network").

    Attributes:
      config: the model configuration.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, x: Array, mask: Array, deterministic: bool) -> Array:
        """Args: x [2, B, T, Hf] (speech, text); mask bool [B, T]. Returns [2, B, T, Hf]."""
        cfg = self.config

        def sublayer(name: str, queries: Array, keys: Array) -> Array:
            attended = StackedMultiHeadAttention(
                cfg.attention_heads,
                cfg.attention_dim,
                cfg.fusion_dim,
                cfg.attention_dropout,
                cfg.init,
                jnp.dtype(cfg.dtype),
                cfg.causal,
                name=f"{name}_attention",
            )(queries, keys, mask, deterministic)
            attended = Dropout(cfg.fusion_dropout)(attended, deterministic=deterministic)
            return StackedLayerNorm(name=f"{name}_norm")(queries + attended)

        x = sublayer("cross", x, _swap_streams(x))
        return sublayer("self", x, x)


class MultimodalNetwork(nn.Module):
    """The multimodal expert (Eq. 5–9):

        X^s_0 = FC_in(E^s), X^t_0 = FC_in(E^t)              input projections to Hf (Eq. 5's FC(E))
        X_l = CrossModalLayer(X_{l-1}), l = 1 .. L          Eq. 5–8
        M^s = X^s_L + FC_res(E^s), M^t = X^t_L + FC_res(E^t) residual projections with their own weights
        ŷ^m = FC(ReLU(FC(LN([M^s; M^t]))))                  the classifier (Eq. 9), no dropout in it

    Attributes:
      config: the model configuration.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, speech: Array, text: Array, mask: Array, deterministic: bool):
        """Args: speech [B, T, Ds], text [B, T, Dt], mask bool [B, T].

        Returns:
          (m_speech, m_text, hidden, logits): M^s, M^t [B, T, Hf]; the classifier's hidden layer
          [B, T, Hf]; logits [B, T, C].
        """
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        dense = lambda features, name: Dense(features, cfg.init, dtype, name=name)
        x = jnp.stack(
            [dense(cfg.fusion_dim, "speech_projection")(speech), dense(cfg.fusion_dim, "text_projection")(text)]
        ).astype(jnp.float32)  # [2, B, T, Hf]
        for layer in range(cfg.fusion_layers):
            x = CrossModalLayer(cfg, name=f"layer_{layer}")(x, mask, deterministic)
        m_speech = x[0] + dense(cfg.fusion_dim, "speech_residual")(speech).astype(jnp.float32)
        m_text = x[1] + dense(cfg.fusion_dim, "text_residual")(text).astype(jnp.float32)
        hidden = nn.LayerNorm(epsilon=1e-6, name="classifier_norm")(jnp.concatenate([m_speech, m_text], axis=-1))
        hidden = nn.relu(dense(cfg.fusion_dim, "classifier_hidden")(hidden))
        logits = dense(cfg.num_classes, "classifier_out")(hidden)
        return m_speech, m_text, hidden, logits


class MoEGate(nn.Module):
    """Mixture-of-experts gate (Eq. 10–11): β = softmax(g / gate_temperature) with g = FC(x) ∈ R^3
    ("fc", the paper) or g = FC(ReLU(FC(x))) with `gate_hidden` units ("mlp", the authors' code).

    Attributes:
      config: the model configuration.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """Args: x [B, T, F] (the concatenated expert outputs). Returns β [B, T, 3], float32."""
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        if cfg.gate == "mlp":
            x = nn.relu(Dense(cfg.gate_hidden, cfg.init, dtype, name="hidden")(x))
        g = Dense(3, cfg.init, dtype, name="out")(x).astype(jnp.float32)
        return jax.nn.softmax(g / cfg.gate_temperature, axis=-1)


def _mix(beta: Array, experts: tuple[Array, Array, Array]) -> Array:
    """Σ_k β_k x_k for β [B, T, 3] and three [B, T, F] arrays."""
    return sum(beta[..., k : k + 1] * x.astype(jnp.float32) for k, x in enumerate(experts))


class MisterE(nn.Module):
    """MiSTER-E (Sec. 3): the variants are listed in the module docstring.

    For "mister-e" and "no-loss-moe" the final prediction mixes the experts' *logits*,
    ŷ = β^s ŷ^s + β^t ŷ^t + β^m ŷ^m with β = softmax(FC([ŷ^s; ŷ^t; ŷ^m])) as Eq. 10–11 write it.
    For "feat-moe" the gate sees and mixes the experts' representations (CAN outputs and the multimodal
    classifier's hidden layer, each projected to Hf) and one FC maps the mixture to C logits.

    Attributes:
      config: the model configuration.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, speech: Array | None, text: Array, mask: Array, deterministic: bool = True) -> ModelOutputs:
        """Args: speech [B, T, Ds] (None allowed for "text-only"), text [B, T, Dt], mask bool [B, T].

        Returns:
          ModelOutputs (float32); values at padded positions are finite and meaningless.
        """
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        mask = check_mask(mask)
        check_input("text", text, cfg.text_dim, "text_dim", tuple(mask.shape))
        text = zero_padding(jnp.asarray(text, jnp.float32), mask)
        f32 = lambda x: x.astype(jnp.float32)

        if cfg.variant == "text-only":
            _, (text_logits,) = ContextAdditionNetworks(cfg, ("text",), name="can")((text,), mask, deterministic)
            return ModelOutputs(logits=f32(text_logits), text_logits=f32(text_logits))

        check_input("speech", speech, cfg.speech_dim, "speech_dim", tuple(mask.shape))
        speech = zero_padding(jnp.asarray(speech, jnp.float32), mask)

        if cfg.variant == "monolithic":
            (rep_s, rep_t), _ = ContextAdditionNetworks(cfg, ("speech", "text"), heads=False, name="can")(
                (speech, text), mask, deterministic
            )
            m_s, m_t, _, logits = MultimodalNetwork(cfg, name="multimodal")(rep_s, rep_t, mask, deterministic)
            return ModelOutputs(logits=f32(logits), m_speech=f32(m_s), m_text=f32(m_t))

        (rep_s, rep_t), (logits_s, logits_t) = ContextAdditionNetworks(cfg, ("speech", "text"), name="can")(
            (speech, text), mask, deterministic
        )
        m_s, m_t, hidden_m, logits_m = MultimodalNetwork(cfg, name="multimodal")(speech, text, mask, deterministic)
        if cfg.variant == "feat-moe":
            features = tuple(
                Dense(cfg.fusion_dim, cfg.init, dtype, name=f"{name}_feature_projection")(x)
                for name, x in (("speech", rep_s), ("text", rep_t), ("multimodal", hidden_m))
            )
            beta = MoEGate(cfg, name="gate")(jnp.concatenate(features, axis=-1))
            mixture = _mix(beta, features).astype(dtype)
            logits = Dense(cfg.num_classes, cfg.init, dtype, name="feature_classifier")(mixture)
        else:
            experts = (logits_s, logits_t, logits_m)
            beta = MoEGate(cfg, name="gate")(jnp.concatenate(experts, axis=-1))
            logits = _mix(beta, experts)
        return ModelOutputs(
            logits=f32(logits),
            speech_logits=f32(logits_s),
            text_logits=f32(logits_t),
            multimodal_logits=f32(logits_m),
            gate=beta,
            m_speech=f32(m_s),
            m_text=f32(m_t),
        )
