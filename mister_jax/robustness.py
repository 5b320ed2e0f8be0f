"""A missing or degraded modality at test time, and the training-time modality dropout that prepares a
model for it.

What a missing modality feeds the model: zeros, the value the model already gives padded utterances
(inputs are zeroed at padding before any layer), so "absent" and "padding" look alike to every
layer, and no statistic of the training data is needed at test time. Perturbations (``--perturb``):

  none               the features as they are
  drop-speech        speech features replaced by zeros (text likewise with drop-text)
  noise-speech=σ     speech features plus Gaussian noise of σ times each dimension's standard
                     deviation over the split (text likewise), drawn with a fixed seed

Modality dropout (``--set modality_dropout=p``, `ModelConfig.modality_dropout`): while training, each
conversation of a batch has, with probability p, one of its two modalities (speech or text with equal
probability) replaced by zeros, for the whole conversation (`apply_modality_dropout`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from mister_jax.input_pipeline import SplitData

PERTURBATIONS = ("none", "drop-speech", "drop-text", "noise-speech", "noise-text")
NOISE_SEED = 0


def parse_perturbations(text: str) -> list[tuple[str, float]]:
    """``"none,drop-speech,noise-text=0.5"`` → ``[("none", 0.0), ("drop-speech", 0.0), ("noise-text", 0.5)]``."""
    parsed = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        name, _, value = item.partition("=")
        if name not in PERTURBATIONS:
            raise ValueError(f"--perturb {item}: unknown; choose from {', '.join(PERTURBATIONS)} (noise-*=σ)")
        if name.startswith("noise"):
            try:
                sigma = float(value)
            except ValueError:
                raise ValueError(f"--perturb {item}: expected {name}=σ with σ a number, e.g. {name}=0.5") from None
            if sigma < 0:
                raise ValueError(f"--perturb {item}: σ must be >= 0")
            parsed.append((name, sigma))
        elif value:
            raise ValueError(f"--perturb {item}: {name} takes no value")
        else:
            parsed.append((name, 0.0))
    return parsed


def perturbation_name(name: str, sigma: float) -> str:
    return f"{name}={sigma:g}" if name.startswith("noise") else name


def perturb(data: SplitData, name: str, sigma: float = 0.0) -> SplitData:
    """``data`` with one modality dropped or noised (see the module docstring); the other modality,
    the labels and the conversations are the same arrays."""
    if name == "none":
        return data
    action, modality = name.split("-")
    if modality not in data.features:
        raise ValueError(f"--perturb {name}: the run does not read the {modality} modality")
    x = data.features[modality]  # [N, D]
    if action == "drop":
        changed = np.zeros_like(x)
    else:
        noise = np.random.default_rng(NOISE_SEED).standard_normal(x.shape).astype(x.dtype)
        changed = x + sigma * x.std(axis=0, keepdims=True) * noise
    return dataclasses.replace(data, features={**data.features, modality: changed})


def apply_modality_dropout(speech: jax.Array, text: jax.Array, rate: float, key: jax.Array):
    """Training-time modality dropout: per conversation, with probability ``rate``, zeroes either its
    speech or its text features (equal odds). Args: speech, text [B, T, D]; returns both."""
    drop_key, which_key = jax.random.split(key)
    batch = speech.shape[0]
    dropped = jax.random.uniform(drop_key, (batch,)) < rate  # [B]
    speech_side = jax.random.bernoulli(which_key, 0.5, (batch,))  # [B] True: speech is the one dropped
    keep_speech = ~(dropped & speech_side)[:, None, None]
    keep_text = ~(dropped & ~speech_side)[:, None, None]
    return (jnp.where(keep_speech, speech, jnp.zeros((), speech.dtype)),
            jnp.where(keep_text, text, jnp.zeros((), text.dtype)))
