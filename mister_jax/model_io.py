"""What enters and leaves `mister_jax.model.MisterE`: the outputs' dataclass, the checks that turn a
badly shaped input into one readable error before any layer sees it, and the zeroing of padded rows."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp

Array = jax.Array


@flax.struct.dataclass
class ModelOutputs:
    """Outputs of `MisterE`; fields a variant does not produce are None.

    Attributes:
      logits: [B, T, C] final prediction ŷ (the gated mixture for the MoE variants).
      speech_logits, text_logits, multimodal_logits: [B, T, C] expert predictions ŷ^s, ŷ^t, ŷ^m.
      gate: [B, T, 3] gate weights (β^s, β^t, β^m).
      m_speech, m_text: [B, T, Hf] fused representations M^s, M^t of the multimodal network (Eq. 13).
    """

    logits: Array
    speech_logits: Array | None = None
    text_logits: Array | None = None
    multimodal_logits: Array | None = None
    gate: Array | None = None
    m_speech: Array | None = None
    m_text: Array | None = None


def check_mask(mask: Any) -> Array:
    """``mask`` as a bool [B, T] array; a mask of another rank is refused."""
    mask = jnp.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(
            f"mister_jax/model.py: mask has shape {tuple(mask.shape)}, expected [B, T]; "
            "pass one boolean row per conversation."
        )
    return mask.astype(bool)


def check_input(name: str, x: Any, dim: int, flag: str, mask_shape: tuple[int, ...]) -> None:
    """Refuses features ``x`` [B, T, D] that are missing or do not match the mask or ``dim``."""
    if x is None:
        raise ValueError(f"mister_jax/model.py: {name} features are missing; pass them or use variant='text-only'.")
    if x.ndim != 3 or tuple(x.shape[:2]) != mask_shape:
        raise ValueError(
            f"mister_jax/model.py: {name} has shape {tuple(x.shape)}, expected [B, T, D] with "
            f"[B, T] = {list(mask_shape)} (the mask's shape); batch the features like the mask."
        )
    if x.shape[-1] != dim:
        raise ValueError(
            f"mister_jax/model.py: {name} has dim {x.shape[-1]} but ModelConfig.{flag}={dim}; "
            f"set {flag}={x.shape[-1]} (the feature store's dim)."
        )


def zero_padding(x: Array, mask: Array) -> Array:
    """Zeroes the padded rows of x [B, T, D] (mask bool [B, T])."""
    return jnp.where(mask[..., None], x, jnp.zeros((), x.dtype))
