"""A causal MiSTER-E (`ModelConfig.causal`) one utterance at a time, for live conversations.

    state = init_state(model_cfg)
    step = jitted_stream_step(model_cfg)
    state, prediction = step(params, ensure_capacity(state, t + 1), {"speech": [Ds], "text": [Dt]})

A causal model's prediction for utterance t depends on utterances 0..t only, so each new utterance
costs one step of every layer instead of a pass over the conversation so far. What a layer carries
from one utterance to the next (`StreamState`):

  temporal inception  the last k - 1 = 4 inputs of each CAN (the window of its widest convolution);
  forward GRUs        each layer's state h of each modality;
  attentions          the projected keys and values of every utterance so far, per multimodal layer,
                      sub-layer (cross, self) and stream, in a buffer of `capacity` rows that
                      `ensure_capacity` doubles before it would overflow (a new shape: one more compile).

`stream_step` reads `mister_jax.model.MisterE`'s parameter tree and computes for the newest utterance
what the batch model computes for it (tests/test_stream.py holds the two equal), in float32 whatever
`ModelConfig.dtype` (the parameters are float32). Its prediction has the keys of
`mister_jax.steps.predict_step`.
"""

from __future__ import annotations

import functools

import flax
import jax
import jax.numpy as jnp

from mister_jax.config import ModelConfig
from mister_jax.input_pipeline import required_modalities

Array = jax.Array
KERNELS = (1, 3, 5)  # the temporal inception's convolution widths (Eq. 3)
WINDOW = max(KERNELS) - 1
INITIAL_CAPACITY = 128  # utterances of key/value buffer before the first doubling


@flax.struct.dataclass
class StreamState:
    """What one conversation's next step needs.

    Attributes:
      position: int32 [], utterances seen so far (the newest one's index).
      window: per CAN modality, its last `WINDOW` inputs [WINDOW, D_m], oldest first (zeros before
        the first utterance, as the causal convolutions' left padding).
      gru: [L, M, H] the GRU state of every layer and modality.
      keys: [fusion_layers, 2 (cross, self), 2 (speech, text), capacity, 2A] projected keys and values
        of utterances 0 .. position - 1 (None for "text-only", which has no multimodal network).
    """

    position: Array
    window: tuple
    gru: Array
    keys: Array | None


def init_state(cfg: ModelConfig, capacity: int = INITIAL_CAPACITY) -> StreamState:
    """The state before a conversation's first utterance; a bidirectional configuration is refused."""
    if not cfg.causal:
        raise ValueError(
            "mister_jax/stream.py: ModelConfig.causal is False, so every prediction depends on later "
            "utterances; train with --set causal=true to predict a conversation as it happens."
        )
    dims = {"speech": cfg.speech_dim, "text": cfg.text_dim}
    modalities = required_modalities(cfg.variant)
    keys = None
    if cfg.variant != "text-only":
        keys = jnp.zeros((cfg.fusion_layers, 2, 2, capacity, 2 * cfg.attention_dim), jnp.float32)
    return StreamState(
        position=jnp.zeros((), jnp.int32),
        window=tuple(jnp.zeros((WINDOW, dims[m]), jnp.float32) for m in modalities),
        gru=jnp.zeros((cfg.gru_layers, len(modalities), cfg.can_hidden), jnp.float32),
        keys=keys,
    )


def ensure_capacity(state: StreamState, length: int) -> StreamState:
    """``state`` with room for the keys of ``length`` utterances (its buffer doubled until it fits)."""
    if state.keys is None or length <= state.keys.shape[3]:
        return state
    capacity = state.keys.shape[3]
    while capacity < length:
        capacity *= 2
    padding = [(0, 0)] * state.keys.ndim
    padding[3] = (0, capacity - state.keys.shape[3])
    return state.replace(keys=jnp.pad(state.keys, padding))


def _dense(p: dict, x: Array) -> Array:
    return x @ p["kernel"] + p["bias"]


def _stacked_dense(p: dict, x: Array) -> Array:
    """x [S, in] through S layers: kernels [S, in, out], biases [S, out]."""
    return jnp.einsum("si,sio->so", x, p["kernels"]) + p["biases"]


def _normalise(x: Array, scale: Array, bias: Array) -> Array:
    """LayerNorm over the last axis (epsilon 1e-6, as the model's)."""
    mean = jnp.mean(x, axis=-1, keepdims=True)
    variance = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(variance + 1e-6) * scale + bias


def _inception(p: dict, window: Array) -> Array:
    """Eq. 3 at the newest utterance: window [WINDOW + 1, D] (newest last) → [2H]; convolution k reads
    its last k rows, tap j the row k - 1 - j utterances back."""
    return sum(
        jax.nn.relu(jnp.einsum("jd,djf->f", window[WINDOW + 1 - k :], p[f"conv{k}"]["kernel"]) + p[f"conv{k}"]["bias"])
        for k in KERNELS
    )


def _gru_cell(p: dict, layer: int, x: Array, h: Array) -> Array:
    """One step of every modality's GRU of ``layer`` (PyTorch gates r, z, n): x [M, I], h [M, H] → [M, H]."""
    gx = jnp.einsum("mi,mik->mk", x, p[f"w_ih_{layer}"]) + p[f"b_ih_{layer}"]
    gh = jnp.einsum("mh,mhk->mk", h, p[f"w_hh_{layer}"]) + p[f"b_hh_{layer}"]
    xr, xz, xn = jnp.split(gx, 3, axis=-1)
    hr, hz, hn = jnp.split(gh, 3, axis=-1)
    r, z = jax.nn.sigmoid(xr + hr), jax.nn.sigmoid(xz + hz)
    return (1.0 - z) * jnp.tanh(xn + r * hn) + z * h


def _can_step(p: dict, cfg: ModelConfig, state: StreamState, inputs: tuple, heads: bool):
    """The CANs (Eq. 3–4) at the newest utterance: inputs, one [D_m] per modality.

    Returns (window, gru, representations [H] per modality, logits [C] per modality or None)."""
    names = required_modalities(cfg.variant)
    windows = [jnp.concatenate([w, x[None]]) for w, x in zip(state.window, inputs)]  # [WINDOW + 1, D_m]
    x = jnp.stack([_inception(p[f"{name}_inception"], w) for name, w in zip(names, windows)])  # [M, 2H]
    states = []
    for layer in range(cfg.gru_layers):
        x = _gru_cell(p["gru"], layer, x, state.gru[layer])  # [M, H]
        states.append(x)
    representations = [h + _dense(p[f"{name}_residual"], e) for name, h, e in zip(names, x, inputs)]
    logits = [_dense(p[f"{name}_head"], h) for name, h in zip(names, representations)] if heads else None
    return tuple(w[1:] for w in windows), jnp.stack(states), representations, logits


def _attention_step(p: dict, queries: Array, keys: Array, cache: Array, position: Array, heads: int):
    """Both streams' multi-head attention of the newest utterance over utterances 0..position.

    Args: queries, keys [2, F] (the newest utterance's); cache [2, capacity, 2A] earlier projected
    keys and values. Returns (output [2, out], cache with the newest keys and values at ``position``)."""
    cache = jax.lax.dynamic_update_slice_in_dim(cache, _stacked_dense(p["key_value"], keys)[:, None], position, axis=1)
    k, v = jnp.split(cache, 2, axis=-1)  # [2, capacity, A]
    streams, capacity, width = k.shape
    head_dim = width // heads
    q = _stacked_dense(p["query"], queries).reshape(streams, heads, head_dim)
    k, v = k.reshape(streams, capacity, heads, head_dim), v.reshape(streams, capacity, heads, head_dim)
    logits = jnp.einsum("shd,skhd->shk", q, k) / jnp.sqrt(head_dim)
    logits = jnp.where(jnp.arange(capacity) <= position, logits, jnp.finfo(jnp.float32).min)
    out = jnp.einsum("shk,skhd->shd", jax.nn.softmax(logits, axis=-1), v).reshape(streams, width)
    return _stacked_dense(p["out"], out), cache


def _multimodal_step(p: dict, cfg: ModelConfig, state: StreamState, speech: Array, text: Array):
    """The multimodal network (Eq. 5–9) at the newest utterance.

    Returns (keys, hidden [Hf], logits [C]): the key/value buffer with the newest utterance's, the
    classifier's hidden layer and its logits."""
    x = jnp.stack([_dense(p["speech_projection"], speech), _dense(p["text_projection"], text)])  # [2, Hf]
    caches = []
    for layer in range(cfg.fusion_layers):
        lp, cache = p[f"layer_{layer}"], state.keys[layer]
        norm = lambda name, y: _normalise(y, lp[f"{name}_norm"]["scales"], lp[f"{name}_norm"]["biases"])
        attended, cross = _attention_step(
            lp["cross_attention"], x, x[::-1], cache[0], state.position, cfg.attention_heads
        )
        x = norm("cross", x + attended)  # Eq. 5–6: speech queries text, text queries speech
        attended, own = _attention_step(lp["self_attention"], x, x, cache[1], state.position, cfg.attention_heads)
        x = norm("self", x + attended)  # Eq. 7–8
        caches.append(jnp.stack([cross, own]))
    m_speech = x[0] + _dense(p["speech_residual"], speech)
    m_text = x[1] + _dense(p["text_residual"], text)
    fused = jnp.concatenate([m_speech, m_text])
    norm = p["classifier_norm"]
    hidden = jax.nn.relu(_dense(p["classifier_hidden"], _normalise(fused, norm["scale"], norm["bias"])))
    return jnp.stack(caches), hidden, _dense(p["classifier_out"], hidden)


def _gate(p: dict, cfg: ModelConfig, x: Array) -> Array:
    """β (Eq. 10–11) of x [F] → [3]."""
    if cfg.gate == "mlp":
        x = jax.nn.relu(_dense(p["hidden"], x))
    return jax.nn.softmax(_dense(p["out"], x) / cfg.gate_temperature)


def stream_step(params: dict, state: StreamState, utterance: dict, *, model_cfg: ModelConfig):
    """The newest utterance of a conversation through the causal model: ``(state, prediction)``.

    Args:
      params: `MisterE(model_cfg)`'s parameters (an argument, not a closed-over constant, so one
        compilation serves any parameters).
      state: the conversation's `StreamState` (with room for this utterance: `ensure_capacity`).
      utterance: ``{"speech": [Ds], "text": [Dt]}`` (``speech`` unused by "text-only").

    Returns:
      the state after this utterance, and ``{"moe": probs [C], <expert>: probs [C], "gate": [3]}`` with
      the experts and the gate the variant has, as `mister_jax.steps.predict_step`.
    """
    cfg = model_cfg
    inputs = tuple(jnp.asarray(utterance[m], jnp.float32) for m in required_modalities(cfg.variant))
    window, gru, reps, logits = _can_step(params["can"], cfg, state, inputs, cfg.variant != "monolithic")
    new_state = lambda keys: StreamState(state.position + 1, window, gru, keys)
    if cfg.variant == "text-only":
        probs = jax.nn.softmax(logits[0])
        return new_state(None), {"moe": probs, "text": probs}
    if cfg.variant == "monolithic":
        keys, _, final = _multimodal_step(params["multimodal"], cfg, state, reps[0], reps[1])
        return new_state(keys), {"moe": jax.nn.softmax(final)}
    keys, hidden, logits_m = _multimodal_step(params["multimodal"], cfg, state, inputs[0], inputs[1])
    if cfg.variant == "feat-moe":
        experts = tuple(
            _dense(params[f"{name}_feature_projection"], x)
            for name, x in (("speech", reps[0]), ("text", reps[1]), ("multimodal", hidden))
        )
        beta = _gate(params["gate"], cfg, jnp.concatenate(experts))
        final = _dense(params["feature_classifier"], sum(beta[k] * x for k, x in enumerate(experts)))
    else:
        experts = (logits[0], logits[1], logits_m)
        beta = _gate(params["gate"], cfg, jnp.concatenate(experts))
        final = sum(beta[k] * x for k, x in enumerate(experts))
    prediction = {"moe": jax.nn.softmax(final), "gate": beta}
    for name, x in zip(("speech", "text", "multimodal"), (logits[0], logits[1], logits_m)):
        prediction[name] = jax.nn.softmax(x)
    return new_state(keys), prediction


@functools.lru_cache(maxsize=8)
def jitted_stream_step(model_cfg: ModelConfig):
    """`stream_step` jitted once per configuration: ``step(params, state, utterance)``."""
    return jax.jit(functools.partial(stream_step, model_cfg=model_cfg))
