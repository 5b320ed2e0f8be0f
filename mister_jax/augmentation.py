"""Training-time modality dropout (`ModelConfig.modality_dropout`; `mister_jax.robustness` tests a run
without a modality): each conversation of a training batch has, with probability p, one of its two
modalities (speech or text, equal odds) replaced by zeros for the whole conversation, the value a
missing modality is fed at test time."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def apply_modality_dropout(speech: jax.Array, text: jax.Array, rate: float, key: jax.Array):
    """Training-time modality dropout: per conversation, with probability ``rate``, zeroes either its
    speech or its text features (equal odds). Args: speech, text [B, T, D]; returns both."""
    drop_key, which_key = jax.random.split(key)
    batch = speech.shape[0]
    dropped = jax.random.uniform(drop_key, (batch,)) < rate  # [B]
    speech_side = jax.random.bernoulli(which_key, 0.5, (batch,))  # [B] True: speech is the one dropped
    keep_speech = ~(dropped & speech_side)[:, None, None]
    keep_text = ~(dropped & ~speech_side)[:, None, None]
    return (
        jnp.where(keep_speech, speech, jnp.zeros((), speech.dtype)),
        jnp.where(keep_text, text, jnp.zeros((), text.dtype)),
    )
