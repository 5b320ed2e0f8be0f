"""Eager PyTorch MiSTER-E, written from DESIGN §3-4, as the authors run it (the benchmark's baseline).

Batches are padded to the longest conversation of the batch; the GRU runs on packed sequences
(`pack_padded_sequence`), attention ignores padded keys, losses reduce over real utterances only.
This file is the yardstick for `benchmarks/train_epoch.py`, not part of the three packages.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from common import Dims


class ContextAdditionNetwork(nn.Module):
    """CAN (Eq. 3, 4): inception convs (k = 1, 3, 5) → L-layer BiGRU, plus a residual FC; FC → C logits."""

    def __init__(self, in_dim: int, hidden: int, layers: int, num_classes: int, dropout: float = 0.2):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv1d(in_dim, 2 * hidden, k, padding=k // 2) for k in (1, 3, 5))
        self.gru = nn.GRU(2 * hidden, hidden, num_layers=layers, batch_first=True, bidirectional=True)
        self.residual = nn.Linear(in_dim, 2 * hidden)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(2 * hidden, num_classes)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor):
        """x [B, T, D] zero at padded rows, lengths [B] → (representation [B, T, 2H], logits [B, T, C])."""
        xc = x.transpose(1, 2)
        inception = sum(F.relu(conv(xc)) for conv in self.convs).transpose(1, 2)
        packed = pack_padded_sequence(inception, lengths, batch_first=True, enforce_sorted=False)
        context, _ = self.gru(packed)
        context, _ = pad_packed_sequence(context, batch_first=True, total_length=x.shape[1])
        h = self.dropout(context + self.residual(x))
        return h, self.head(h)


class Attention(nn.Module):
    """Multi-head attention of width `dim` (all heads together) from `model_dim` back to `model_dim`."""

    def __init__(self, model_dim: int, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(model_dim, dim)
        self.k = nn.Linear(model_dim, dim)
        self.v = nn.Linear(model_dim, dim)
        self.out = nn.Linear(dim, model_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, query: torch.Tensor, source: torch.Tensor, key_mask: torch.Tensor):
        """query [B, T, F], source [B, S, F], key_mask [B, S] bool → [B, T, F]."""
        b, t, _ = query.shape
        split = lambda y: y.view(b, y.shape[1], self.heads, -1).transpose(1, 2)
        q, k, v = split(self.q(query)), split(self.k(source)), split(self.v(source))
        scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        scores = scores.masked_fill(~key_mask[:, None, None, :], torch.finfo(scores.dtype).min)
        weights = self.dropout(scores.softmax(-1))
        return self.out((weights @ v).transpose(1, 2).reshape(b, t, -1))


class FusionLayer(nn.Module):
    """Eq. 5-8: bidirectional cross-attention M^{t→s} = LN(FC(E^s) + MHA(Q^s, K^t, V^t)), then self-attention."""

    def __init__(self, dim: int, att_dim: int, heads: int, dropout: float):
        super().__init__()
        self.cross = nn.ModuleList(Attention(dim, att_dim, heads, dropout) for _ in range(2))
        self.skip = nn.ModuleList(nn.Linear(dim, dim) for _ in range(2))
        self.cross_norm = nn.ModuleList(nn.LayerNorm(dim) for _ in range(2))
        self.self_att = nn.ModuleList(Attention(dim, att_dim, heads, dropout) for _ in range(2))
        self.self_norm = nn.ModuleList(nn.LayerNorm(dim) for _ in range(2))

    def forward(self, s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor):
        s2 = self.cross_norm[0](self.skip[0](s) + self.cross[0](s, t, mask))
        t2 = self.cross_norm[1](self.skip[1](t) + self.cross[1](t, s, mask))
        s3 = self.self_norm[0](s2 + self.self_att[0](s2, s2, mask))
        t3 = self.self_norm[1](t2 + self.self_att[1](t2, t2, mask))
        return s3, t3


class MultimodalNetwork(nn.Module):
    """Eq. 5-9: project E^s, E^t to F, `layers` fusion layers, M = output + projected input,
    [M^s; M^t] → LN → FC → ReLU → dropout → FC."""

    def __init__(self, speech_dim: int, text_dim: int, dim: int, layers: int, att_dim: int, heads: int,
                 num_classes: int, dropout: float = 0.5):
        super().__init__()
        self.proj_s = nn.Linear(speech_dim, dim)
        self.proj_t = nn.Linear(text_dim, dim)
        self.layers = nn.ModuleList(FusionLayer(dim, att_dim, heads, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(2 * dim)
        self.fc = nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, num_classes)
        self.dropout = nn.Dropout(dropout)

    def forward(self, hs: torch.Tensor, ht: torch.Tensor, mask: torch.Tensor):
        s_in, t_in = self.proj_s(hs), self.proj_t(ht)
        s, t = s_in, t_in
        for layer in self.layers:
            s, t = layer(s, t, mask)
        m_s, m_t = s + s_in, t + t_in
        hidden = self.dropout(F.relu(self.fc(self.norm(torch.cat([m_s, m_t], -1)))))
        return m_s, m_t, self.head(hidden)


class MisterE(nn.Module):
    """Two CANs (speech, text), the multimodal network on E^s, E^t, and the FC gate (Eq. 10, 11)."""

    def __init__(self, dims: Dims):
        super().__init__()
        h = dims.can_hidden
        self.can_s = ContextAdditionNetwork(dims.speech_dim, h, dims.gru_layers, dims.num_classes)
        self.can_t = ContextAdditionNetwork(dims.text_dim, h, dims.gru_layers, dims.num_classes)
        self.multimodal = MultimodalNetwork(dims.speech_dim, dims.text_dim, dims.fusion_dim, dims.fusion_layers,
                                            dims.attention_dim, dims.attention_heads, dims.num_classes)
        self.gate = nn.Linear(3 * dims.num_classes, 3)

    def forward(self, speech, text, mask):
        """speech [B, T, Ds], text [B, T, Dt] (zero at padded rows), mask bool [B, T] → dict of outputs."""
        lengths = mask.sum(1).cpu()
        _, ys = self.can_s(speech, lengths)
        _, yt = self.can_t(text, lengths)
        m_s, m_t, ym = self.multimodal(speech, text, mask)
        beta = self.gate(torch.cat([ys, yt, ym], -1)).softmax(-1)
        y = beta[..., :1] * ys + beta[..., 1:2] * yt + beta[..., 2:] * ym
        return {"logits": y, "speech_logits": ys, "text_logits": yt, "multimodal_logits": ym,
                "gate": beta, "m_speech": m_s, "m_text": m_t}


def focal_loss(logits, labels, mask, gamma):
    """Eq. 19, mean over real utterances."""
    logp = logits.log_softmax(-1).gather(-1, labels[..., None]).squeeze(-1)
    term = -((1 - logp.exp()) ** gamma) * logp
    return (term * mask).sum() / mask.sum()


def supervised_contrastive_loss(m_speech, m_text, labels, mask, temperature):
    """Eq. 13-14 per conversation, batched: [B, T, F] x 2 → mean over real anchors with a positive."""
    z = F.normalize(torch.cat([m_speech, m_text], 1), dim=-1)          # [B, 2T, F]
    y = torch.cat([labels, labels], 1)
    real = torch.cat([mask, mask], 1)
    n = z.shape[1]
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    valid = real[:, :, None] & real[:, None, :] & ~eye                  # pairs (a, q), q ≠ a
    logits = (z @ z.transpose(1, 2)) / temperature
    logits = logits.masked_fill(~valid, torch.finfo(logits.dtype).min)
    log_prob = logits - logits.logsumexp(-1, keepdim=True)
    positive = valid & (y[:, :, None] == y[:, None, :])
    count = positive.sum(-1)
    per_anchor = -(log_prob * positive).sum(-1) / count.clamp(min=1)
    anchors = real & (count > 0)
    return (per_anchor * anchors).sum() / anchors.sum().clamp(min=1)


def kl_consistency(ym, ys, yt, mask):
    """Eq. 17: KL(p^m ‖ p^s) + KL(p^m ‖ p^t), mean over real utterances."""
    lm = ym.log_softmax(-1)
    pm = lm.exp()
    kl = (pm * (lm - ys.log_softmax(-1))).sum(-1) + (pm * (lm - yt.log_softmax(-1))).sum(-1)
    return (kl * mask).sum() / mask.sum()


def total_loss(out, labels, mask, gamma=3.0, lambda_con=2.0, alpha_kl=0.1, temperature=1.0):
    """Eq. 18: L_CAN + L_multi + L_moe."""
    m = mask.float()
    fl = lambda z: focal_loss(z, labels, m, gamma)
    con = supervised_contrastive_loss(out["m_speech"], out["m_text"], labels, mask, temperature)
    kl = kl_consistency(out["multimodal_logits"], out["speech_logits"], out["text_logits"], m)
    return (fl(out["speech_logits"]) + fl(out["text_logits"]) + fl(out["multimodal_logits"])
            + lambda_con * con + fl(out["logits"]) + alpha_kl * kl)


def train_step(model, optimizer, speech, text, labels, mask):
    """One Adam step with gradient clipping at global norm 1.0; returns the loss as a float."""
    optimizer.zero_grad(set_to_none=True)
    loss = total_loss(model(speech, text, mask), labels, mask)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss.item()
