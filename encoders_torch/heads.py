"""Pooling, classifier head and focal loss shared by the text and speech encoders (DESIGN §7).

Head (Sec. 3.2): last hidden states `[B, L, D]` → LayerNorm → pooling over real positions
(attentive statistics for text, mean for speech) → `FC → E` (E = 2048) → ReLU → dropout → `FC → C`.
The utterance embedding written to the feature store is the output of the first FC, `[B, E]`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

POOLINGS = ("attentive", "mean")
HEAD_WEIGHTS = "head.safetensors"
HEAD_CONFIG = "head_config.json"


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    input_dim: int
    num_classes: int
    pooling: str = "attentive"  # "attentive" | "mean"
    embedding_dim: int = 2048
    dropout: float = 0.1
    attention_dim: int = 128


def focal_loss(logits: torch.Tensor, labels: torch.Tensor, gamma: float) -> torch.Tensor:
    """Eq. 19: mean over the batch of `-(1 - p_y)^γ log p_y`; logits `[B, C]`, labels int `[B]`. γ = 0 is CE."""
    log_p = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels[:, None]).squeeze(-1)
    return (-(1.0 - log_p.exp()).pow(gamma) * log_p).mean()


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `hidden [B, L, D]` over positions where `mask [B, L]` is true → `[B, D]`."""
    weights = mask.to(hidden.dtype)[..., None]
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


class AttentiveStatisticsPooling(nn.Module):
    """Attention-weighted mean and standard deviation over real positions: `[B, L, D]` → `[B, 2D]`.

    `e_l = vᵀ tanh(W h_l + b)`, `α = softmax(e)` over positions with `mask`, `μ = Σ α_l h_l`,
    `σ = sqrt(Σ α_l h_l² − μ²)`.
    """

    def __init__(self, dim: int, attention_dim: int):
        super().__init__()
        self.project = nn.Linear(dim, attention_dim)
        self.score = nn.Linear(attention_dim, 1)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        scores = self.score(torch.tanh(self.project(hidden))).squeeze(-1)  # [B, L]
        scores = scores.float().masked_fill(~mask, float("-inf"))
        alpha = torch.softmax(scores, dim=-1).to(hidden.dtype)[..., None]  # [B, L, 1]
        mean = (alpha * hidden).sum(1)
        variance = (alpha * hidden * hidden).sum(1) - mean * mean
        return torch.cat([mean, variance.clamp_min(1e-6).sqrt()], dim=-1)


class ClassifierHead(nn.Module):
    """LayerNorm → pooling → FC → ReLU → dropout → FC. `forward` returns (logits `[B, C]`, embedding `[B, E]`)."""

    def __init__(self, config: HeadConfig):
        super().__init__()
        if config.pooling not in POOLINGS:
            raise ValueError(f"pooling={config.pooling!r}: choose one of {POOLINGS}")
        self.config = config
        self.norm = nn.LayerNorm(config.input_dim)
        pooled = config.input_dim
        if config.pooling == "attentive":
            self.pool = AttentiveStatisticsPooling(config.input_dim, config.attention_dim)
            pooled = 2 * config.input_dim
        self.embed = nn.Linear(pooled, config.embedding_dim)
        self.dropout = nn.Dropout(config.dropout)
        self.classify = nn.Linear(config.embedding_dim, config.num_classes)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.norm(hidden.to(self.norm.weight.dtype))
        pooled = self.pool(hidden, mask) if self.config.pooling == "attentive" else masked_mean(hidden, mask)
        embedding = self.embed(pooled)
        logits = self.classify(self.dropout(torch.relu(embedding)))
        return logits, embedding

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, directory / HEAD_WEIGHTS)
        (directory / HEAD_CONFIG).write_text(json.dumps(dataclasses.asdict(self.config), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> "ClassifierHead":
        directory = Path(directory)
        config = HeadConfig(**json.loads((directory / HEAD_CONFIG).read_text()))
        head = cls(config)
        head.load_state_dict(load_file(directory / HEAD_WEIGHTS))
        return head
