"""EmoryNLP, seven classes, text only (DESIGN §5; paper Sec. 5.3): batch 8, λ = 2, α = 0.1, τ = 1,
three GRU layers."""

from mister_jax.config import Config, LossConfig, ModelConfig, TrainConfig

LABELS = ("Neutral", "Joyful", "Scared", "Mad", "Peaceful", "Powerful", "Sad")


def get_config(labels: tuple[str, ...] = LABELS) -> Config:
    return Config(
        model=ModelConfig(num_classes=len(labels), gru_layers=3, variant="text-only"),
        loss=LossConfig(lambda_con=2.0, alpha_kl=0.1, temperature=1.0),
        train=TrainConfig(batch_size=8),
    )
