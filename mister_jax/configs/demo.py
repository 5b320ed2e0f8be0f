"""The built-in synthetic demo store (`bridges.demo`): tiny widths and a larger learning rate, so that
it trains in seconds on a CPU; IEMOCAP's classes."""

from mister_jax.config import Config, LossConfig, ModelConfig, TrainConfig
from mister_jax.configs.iemocap import LABELS


def get_config(labels: tuple[str, ...] = LABELS) -> Config:
    return Config(
        model=ModelConfig(
            num_classes=len(labels),
            can_hidden=32,
            gru_layers=1,
            fusion_dim=32,
            fusion_layers=1,
            attention_dim=16,
            attention_heads=2,
        ),
        loss=LossConfig(lambda_con=1.0),
        train=TrainConfig(learning_rate=3e-3, epochs=20, batch_size=8, num_buckets=2),
    )
