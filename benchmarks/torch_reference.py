"""MiSTER-E in eager PyTorch with the layout of the authors' public code (iiscleap/MiSTER-E,
`hierarchical_moe.py`: `AttentionMoE`), written here from its key names, shapes and forward semantics.

Its `state_dict` has the authors' keys (`audio_self.conv`, `fusion.units.0.multihead_attn_aud.in_proj_weight`,
`gate.0.weight`, …), so a checkpoint trained with their scripts loads into it, and
`mister_jax.import_torch` reads either. As theirs, the model sees no mask: attention attends every
position and the GRU runs over the padded tail, so on a padded batch the outputs of a conversation
depend on the padding (only unpadded batches compare with `mister_jax`).

Two reductions of the same loss terms (focal loss on the four outputs, the batch-pooled supervised
contrastive loss over M^s and M^t, the symmetric KL over the three expert pairs):

  masked    `total_loss`: our `--preset authors-code`, every term over the real utterances only
            (on unpadded batches it is what `mister_jax.losses.total_loss` computes with that preset);
  authors   `authors_loss`: as their `train_moe.py` reduces them, padded positions labelled -1.
            Padding leaks into each term differently: the focal terms are 0 at padded positions but
            averaged over all B·T positions, so padding only rescales them; the contrastive loss takes
            the padded rows (their M^s, M^t computed from zero features) as anchors, as negatives of
            every real row and as positives of each other (all labelled -1), and averages over all 2·B·T
            anchors, those without a positive included; the KL sums over every position, padded ones
            included, and divides by B, so it also grows with the padded length T.

This file is the yardstick of `benchmarks/train_epoch.py` (a) and `benchmarks/parity.py`, and the source
of the tests of `mister_jax.import_torch`; it is not part of the three packages.
"""

from __future__ import annotations

import torch
from common import Dims
from torch import nn
from torch.nn import functional as F

AUTHORS_HEADS = 3  # their CrossAttentionModel_s(hidden, 120, 3); `Dims.attention_heads` is the paper's 4


class GRUModel(nn.Module):
    """Context addition network (Eq. 3, 4): `conv`, `conv3`, `conv5` (k = 1, 3, 5, 'same') with ReLU, summed →
    `rnn_1` (bidirectional GRU, `layers` deep) → + `fc_1(x)` → `fc` logits."""

    def __init__(self, in_dim: int, hidden: int, num_classes: int, layers: int):
        super().__init__()
        self.rnn_1 = nn.GRU(2 * hidden, hidden, num_layers=layers, bidirectional=True, batch_first=True)
        self.fc_1 = nn.Linear(in_dim, 2 * hidden)
        self.conv = nn.Conv1d(in_dim, 2 * hidden, 1)
        self.conv3 = nn.Conv1d(in_dim, 2 * hidden, 3, padding=1)
        self.conv5 = nn.Conv1d(in_dim, 2 * hidden, 5, padding=2)
        self.fc = nn.Linear(2 * hidden, num_classes)

    def forward(self, x: torch.Tensor):
        """x [B, T, D] → (representation [B, T, 2H], logits [B, T, C])."""
        channels = x.transpose(1, 2)
        inception = sum(F.relu(conv(channels)) for conv in (self.conv, self.conv3, self.conv5))
        context, _ = self.rnn_1(inception.transpose(1, 2))
        representation = context + self.fc_1(x)
        return representation, self.fc(representation)


class CrossAttentionModel_s(nn.Module):  # noqa: N801 (the authors' class name keeps their key layout readable)
    """One fusion layer (Eq. 5–8): audio and text cross-attention, then self-attention, each sub-layer
    `LN(x + Drop_0.5(FC(MHA(FC_q x, FC_k y, FC_v y))))`; inputs and outputs sequence-first [T, B, F]."""

    def __init__(self, dim: int, attention_dim: int, heads: int):
        super().__init__()
        for stream in ("aud", "asr"):
            for suffix in ("", "_s"):
                for part in "qkv":
                    setattr(self, f"fc_{stream}{part}{suffix}", nn.Linear(dim, attention_dim))
        for name in ("asr", "aud", "selfaud", "selfasr"):
            setattr(self, f"multihead_attn_{name}", nn.MultiheadAttention(attention_dim, heads, dropout=0.1))
        self.dropout = nn.Dropout(0.5)
        for name in ("t", "a", "t_s", "a_s"):
            setattr(self, f"layer_norm_{name}", nn.LayerNorm(dim, eps=1e-6))
        for name in ("fc_text", "fc_audio", "fc_text_s", "fc_aud_s"):
            setattr(self, name, nn.Linear(attention_dim, dim))

    def _sublayer(self, attention, query, key, value, out, norm, residual):
        attended = attention(query, key, value, need_weights=False)[0]
        return norm(residual + self.dropout(out(attended)))

    def forward(self, audio: torch.Tensor, text: torch.Tensor):
        """audio, text [T, B, F] → (text, audio) [T, B, F], the authors' return order."""
        text_x = self._sublayer(
            self.multihead_attn_asr,
            self.fc_asrq(text),
            self.fc_audk(audio),
            self.fc_audv(audio),
            self.fc_text,
            self.layer_norm_t,
            text,
        )
        audio_x = self._sublayer(
            self.multihead_attn_aud,
            self.fc_audq(audio),
            self.fc_asrk(text),
            self.fc_asrv(text),
            self.fc_audio,
            self.layer_norm_a,
            audio,
        )
        text_out = self._sublayer(
            self.multihead_attn_selfasr,
            self.fc_asrq_s(text_x),
            self.fc_asrk_s(text_x),
            self.fc_asrv_s(text_x),
            self.fc_text_s,
            self.layer_norm_t_s,
            text_x,
        )
        audio_out = self._sublayer(
            self.multihead_attn_selfaud,
            self.fc_audq_s(audio_x),
            self.fc_audk_s(audio_x),
            self.fc_audv_s(audio_x),
            self.fc_aud_s,
            self.layer_norm_a_s,
            audio_x,
        )
        return text_out, audio_out


class FusionModel(nn.Module):
    """The multimodal network (Eq. 5–9): `fc_aud`, `fc_text` input projections, `units`, residual projections
    `fc_aud_self`, `fc_text_self`, classifier `bn` (LayerNorm on [text; audio]) → `fc` → ReLU → `fc_2`."""

    def __init__(
        self, speech_dim: int, text_dim: int, dim: int, layers: int, attention_dim: int, heads: int, num_classes: int
    ):
        super().__init__()
        self.fc = nn.Linear(2 * dim, dim)
        self.fc_2 = nn.Linear(dim, num_classes)
        self.units = nn.ModuleList(CrossAttentionModel_s(dim, attention_dim, heads) for _ in range(layers))
        self.fc_aud = nn.Linear(speech_dim, dim)
        self.fc_text = nn.Linear(text_dim, dim)
        self.fc_aud_self = nn.Linear(speech_dim, dim)
        self.fc_text_self = nn.Linear(text_dim, dim)
        self.bn = nn.LayerNorm(2 * dim, eps=1e-6)

    def forward(self, audio_in: torch.Tensor, text_in: torch.Tensor):
        """[B, T, Ds], [B, T, Dt] → (M^s, M^t [B, T, F], logits [B, T, C])."""
        audio = self.fc_aud(audio_in).transpose(0, 1)
        text = self.fc_text(text_in).transpose(0, 1)
        for unit in self.units:
            text, audio = unit(audio, text)
        m_speech = audio.transpose(0, 1) + self.fc_aud_self(audio_in)
        m_text = text.transpose(0, 1) + self.fc_text_self(text_in)
        hidden = F.relu(self.fc(self.bn(torch.cat([m_text, m_speech], -1))))
        return m_speech, m_text, self.fc_2(hidden)


class AttentionMoE(nn.Module):
    """Two CANs (`audio_self`, `text_self`), the fusion network, and the MLP gate `3C → 10 → 3` at softmax
    temperature 2 over the logits of (speech, text, multimodal)."""

    def __init__(
        self, dims: Dims, heads: int | None = None, gate_temperature: float = 2.0, unused_hidden: int | None = None
    ):
        """``heads``: of every attention (default ``dims.attention_heads``; theirs is `AUTHORS_HEADS`).
        ``unused_hidden``: also build their `proj` (Hf → hidden) and `classifier` (hidden → C), which
        their forward never calls (their training script: 768), so that their checkpoints load strictly."""
        super().__init__()
        h = dims.can_hidden
        self.audio_self = GRUModel(dims.speech_dim, h, dims.num_classes, dims.gru_layers)
        self.text_self = GRUModel(dims.text_dim, h, dims.num_classes, dims.gru_layers)
        self.fusion = FusionModel(
            dims.speech_dim,
            dims.text_dim,
            dims.fusion_dim,
            dims.fusion_layers,
            dims.attention_dim,
            heads or dims.attention_heads,
            dims.num_classes,
        )
        self.gate = nn.Sequential(nn.Linear(3 * dims.num_classes, 10), nn.ReLU(), nn.Linear(10, 3))
        self.temperature = gate_temperature
        if unused_hidden:
            self.proj = nn.Linear(dims.fusion_dim, unused_hidden)
            self.classifier = nn.Linear(unused_hidden, dims.num_classes)

    def forward(self, speech: torch.Tensor, text: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
        """speech [B, T, Ds], text [B, T, Dt] → dict of outputs; ``mask`` is accepted and ignored, as theirs."""
        _, ys = self.audio_self(speech)
        _, yt = self.text_self(text)
        m_s, m_t, ym = self.fusion(speech, text)
        beta = F.softmax(self.gate(torch.cat([ys, yt, ym], -1)) / self.temperature, -1)
        y = beta[..., 0:1] * ys + beta[..., 1:2] * yt + beta[..., 2:3] * ym
        return {
            "logits": y,
            "speech_logits": ys,
            "text_logits": yt,
            "multimodal_logits": ym,
            "gate": beta,
            "m_speech": m_s,
            "m_text": m_t,
        }


MisterE = AttentionMoE


def focal_loss(logits, labels, mask, gamma):
    """Eq. 19, mean over real utterances (mask float [B, T])."""
    logp = logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    term = -((1 - logp.exp()) ** gamma) * logp
    return (term * mask).sum() / mask.sum().clamp(min=1)


def supervised_contrastive_loss_batch(m_speech, m_text, labels, mask, temperature):
    """Eq. 13–14 with every real row of the batch pooled: [B, T, F] x 2 → mean over anchors with a positive."""
    keep = mask.reshape(-1)
    z = F.normalize(
        torch.cat([m_speech.reshape(-1, m_speech.shape[-1])[keep], m_text.reshape(-1, m_text.shape[-1])[keep]]), dim=-1
    )  # [2N, F]
    y = labels.reshape(-1)[keep].repeat(2)
    others = ~torch.eye(len(y), dtype=torch.bool)
    logits = (z @ z.T / temperature).masked_fill(~others, float("-inf"))
    log_prob = logits - logits.logsumexp(-1, keepdim=True)
    positive = others & (y[:, None] == y[None, :])
    count = positive.sum(-1)
    per_anchor = -(log_prob.masked_fill(~positive, 0.0)).sum(-1) / count.clamp(min=1)
    anchors = count > 0
    return (per_anchor * anchors).sum() / anchors.sum().clamp(min=1)


def symmetric_kl(ym, ys, yt, mask):
    """(1/3) Σ over the expert pairs of KL(p ‖ q) + KL(q ‖ p), mean over real utterances."""
    logs = [x.log_softmax(-1) for x in (ys, yt, ym)]
    kl = sum(((logs[i].exp() - logs[j].exp()) * (logs[i] - logs[j])).sum(-1) for i, j in ((0, 1), (0, 2), (1, 2)))
    return (kl / 3 * mask).sum() / mask.sum().clamp(min=1)


def total_loss(out, labels, mask, gamma=3.0, lambda_con=2.0, alpha_kl=0.1, temperature=1.0):
    """Eq. 18 with the authors-code terms, over the real, labelled utterances."""
    real = mask & (labels >= 0)
    m = real.float()
    fl = lambda z: focal_loss(z, labels, m, gamma)
    con = supervised_contrastive_loss_batch(out["m_speech"], out["m_text"], labels, real, temperature)
    kl = symmetric_kl(out["multimodal_logits"], out["speech_logits"], out["text_logits"], m)
    return (
        fl(out["speech_logits"])
        + fl(out["text_logits"])
        + fl(out["multimodal_logits"])
        + lambda_con * con
        + fl(out["logits"])
        + alpha_kl * kl
    )


def authors_loss(out, labels, mask, gamma=3.0, lambda_con=2.0, alpha_kl=0.1, temperature=1.0):
    """Eq. 18 with the authors-code terms reduced as their `train_moe.py` reduces them (module docstring):
    positions outside ``mask`` [B, T] get label -1 and stay in every average."""
    labels = labels.masked_fill(~mask, -1)
    b, t = labels.shape
    real = (labels >= 0).float()

    def fl(logits):  # zero at label -1, averaged over all B·T positions
        logp = logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
        return (-((1 - logp.exp()) ** gamma) * logp * real).sum() / (b * t)

    z = F.normalize(torch.cat([out["m_speech"].reshape(b * t, -1), out["m_text"].reshape(b * t, -1)]), dim=-1)
    y = labels.reshape(-1).repeat(2)
    others = ~torch.eye(2 * b * t, dtype=torch.bool)
    log_prob = z @ z.T / temperature
    log_prob = log_prob - log_prob.masked_fill(~others, float("-inf")).logsumexp(-1, keepdim=True)
    positive = others & (y[:, None] == y[None, :])
    con = -((log_prob * positive).sum(-1) / positive.sum(-1).clamp(min=1)).mean()
    logs = [out[k].log_softmax(-1) for k in ("speech_logits", "text_logits", "multimodal_logits")]
    kl = sum(((logs[i].exp() - logs[j].exp()) * (logs[i] - logs[j])).sum() for i, j in ((0, 1), (0, 2), (1, 2)))
    return (
        fl(out["logits"])
        + fl(out["speech_logits"])
        + fl(out["text_logits"])
        + fl(out["multimodal_logits"])
        + lambda_con * con
        + alpha_kl * kl / 3 / b
    )


LOSSES = {"masked": total_loss, "authors": authors_loss}


def train_step(model, optimizer, speech, text, labels, mask, reduction="masked", **loss_kwargs):
    """One Adam step with gradient clipping at global norm 1.0, the loss reduced as ``reduction``
    ("masked" or "authors", module docstring); returns the loss as a float."""
    optimizer.zero_grad(set_to_none=True)
    loss = LOSSES[reduction](model(speech, text, mask), labels, mask, **loss_kwargs)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss.item()
