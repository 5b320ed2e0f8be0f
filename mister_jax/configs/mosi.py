"""CMU-MOSI, two classes (DESIGN §5): batch 8, λ = 1, α = 0.1, τ = 1, three GRU layers."""

from mister_jax.config import Config, LossConfig, ModelConfig, TrainConfig

LABELS = ("negative", "positive")


def get_config(labels: tuple[str, ...] = LABELS) -> Config:
    return Config(
        model=ModelConfig(num_classes=len(labels), gru_layers=3, variant="mister-e"),
        loss=LossConfig(lambda_con=1.0, alpha_kl=0.1, temperature=1.0),
        train=TrainConfig(batch_size=8),
    )
