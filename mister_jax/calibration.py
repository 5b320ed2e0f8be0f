"""Temperature scaling (Guo et al., 2017, "On Calibration of Modern Neural Networks", Sec. 4.2).

One scalar T > 0 divides the logits before the softmax, ``softmax(z / T)``, with T chosen to minimise the
negative log-likelihood on a validation split. The argmax, and so every F1, is unchanged; only the
confidences move. The heads give probabilities, and ``log p`` differs from the logits by a per-row
constant, which the softmax ignores, so scaling ``log p`` is scaling the logits.

The fit is over the inverse temperature a = 1 / T: the NLL ``logsumexp(a z) − a z_y`` is convex in a,
and its derivative ``E_softmax(a z)[z] − z_y`` increases with a, so bisection on the sign of the mean
derivative finds the minimum. `mister_jax.temperature` fits a run's temperatures into
``RUN/temperature.json``; `mister_jax.predict --temperature-scaling` applies them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mister_jax.errors import UsageError

FILE = "temperature.json"
_INVERSE_RANGE = (1e-3, 1e3)  # a = 1/T searched in this bracket, in log space
_BISECTIONS = 60
_TINY = np.finfo(np.float32).tiny


def _log_probs(probs: np.ndarray) -> np.ndarray:
    return np.log(np.maximum(probs.astype(np.float64), _TINY))


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def scaled_nll(probs: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of ``labels [N]`` under ``softmax(log probs [N, C] / temperature)``."""
    z = _log_probs(probs) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    return float(np.mean(np.log(np.exp(z).sum(axis=-1)) - z[np.arange(len(labels)), labels]))


def fit_temperature(probs: np.ndarray, labels: np.ndarray) -> float:
    """The T > 0 minimising `scaled_nll` on ``probs [N, C]``, ``labels [N]`` (real, labelled rows only)."""
    if len(labels) == 0:
        return 1.0
    z = _log_probs(probs)  # [N, C]
    target = z[np.arange(len(labels)), labels]  # [N]

    def slope(log_a: float) -> float:  # d NLL / d a at a = exp(log_a)
        return float(np.mean((_softmax(np.exp(log_a) * z) * z).sum(axis=-1) - target))

    lo, hi = np.log(_INVERSE_RANGE[0]), np.log(_INVERSE_RANGE[1])
    if slope(hi) <= 0:  # the NLL still falls at the largest a: the labels are separable
        return float(np.exp(-hi))
    if slope(lo) >= 0:
        return float(np.exp(-lo))
    for _ in range(_BISECTIONS):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if slope(mid) < 0 else (lo, mid)
    return float(np.exp(-0.5 * (lo + hi)))


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log probs [..., C] / temperature)`` as float32."""
    return _softmax(_log_probs(probs) / temperature).astype(np.float32)


def read_temperatures(run: Path, seed: int) -> dict:
    """``{head: T}`` of ``seed``, from ``run/temperature.json``."""
    path = run / FILE
    fit = f"fit them with `python -m mister_jax.temperature --run {run} --dataset NAME`"
    try:
        per_seed = json.loads(path.read_text(encoding="utf-8"))["per_seed"]
    except FileNotFoundError:
        raise UsageError(f"{path}: missing — {fit}") from None
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise UsageError(f"{path}: unreadable ({err}) — {fit}") from None
    if str(seed) not in per_seed:
        raise UsageError(f"{path}: no temperatures for seed {seed} — {fit}")
    return per_seed[str(seed)]


def scale_heads(probs: dict, temperatures: dict | None) -> dict:
    """``probs`` (``{head: [..., C]}``, and the gate) with every head that ``temperatures`` names scaled by
    its T; the gate and the rest as they were. ``None``: ``probs`` itself."""
    if temperatures is None:
        return probs
    return {h: apply_temperature(p, temperatures[h]) if h in temperatures else p for h, p in probs.items()}
