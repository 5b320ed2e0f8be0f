"""MELD, seven classes (DESIGN §5): batch 32, λ = 1, α = 1e-3, τ = 0.05, two GRU layers."""

from mister_jax.config import Config, LossConfig, ModelConfig, TrainConfig

LABELS = ("neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger")


def get_config(labels: tuple[str, ...] = LABELS) -> Config:
    return Config(
        model=ModelConfig(num_classes=len(labels), gru_layers=2, variant="mister-e"),
        loss=LossConfig(lambda_con=1.0, alpha_kl=1e-3, temperature=0.05),
        train=TrainConfig(batch_size=32),
    )
