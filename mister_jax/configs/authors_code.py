"""What the authors' public code trains where it departs from the paper (DESIGN §3, §4).

3 attention heads, the MLP gate at temperature 2, no dropout in the CANs, the batch-pooled
contrastive loss, the symmetric KL over the three expert pairs, and their fully random batches; padding
is still masked and the model still selected on validation, as everywhere here (their code picks it
on test).
"""

import dataclasses

from mister_jax.config import Config

MODEL = dict(attention_heads=3, gate="mlp", gate_temperature=2.0, can_dropout=0.0)
LOSS = dict(contrastive_scope="batch", kl_form="symmetric")
TRAIN = dict(batching="random")


def apply(config: Config) -> Config:
    """``config`` with the authors' choices; an attention width that does not divide by 3 heads (the
    demo's) is rounded down to a multiple of 3."""
    model = dict(MODEL)
    if config.model.attention_dim % model["attention_heads"]:
        model["attention_dim"] = 3 * (config.model.attention_dim // 3)
    return Config(
        dataclasses.replace(config.model, **model),
        dataclasses.replace(config.loss, **LOSS),
        dataclasses.replace(config.train, **TRAIN),
    )
