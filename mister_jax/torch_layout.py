"""The authors' `AttentionMoE` key layout (iiscleap/MiSTER-E) mapped onto our parameter tree.

The authors' `nn.MultiheadAttention` projects queries, keys and values again (`in_proj`) after the
dense layers in front of it, and its `out_proj` runs before the dense layer behind it; each pair is one
affine map, composed here exactly (in float64): `W = W_2 W_1`, `b = W_2 b_1 + b_2`. Input widths, the
GRU depth and width, the fusion width and depth, the attention width and the class count are read
from the tensors' shapes; the number of heads and the gate's temperature are not in a `state_dict`
(defaults 3 and 2 as in their code). Their fusion classifier reads `[text; audio]`, ours
`[speech; text]`: its LayerNorm and first dense layer are permuted to match.
"""

from __future__ import annotations

import jax
import numpy as np

from mister_jax.config import ModelConfig
from mister_jax.params import param_shapes
from mister_jax.torch_checkpoint import CheckpointFormatError

UNUSED_PREFIXES = ("proj.", "classifier.")  # in their AttentionMoE, never called in its forward


def _config_from_shapes(sd: dict, heads: int, temperature: float) -> ModelConfig:
    width = sd["fusion.units.0.fc_audq.weight"].shape[0]
    if heads < 1 or width % heads:
        raise CheckpointFormatError(
            f"--attention-heads {heads} does not divide the attention width {width} "
            "(fusion.units.0.fc_audq.weight); their code uses 3"
        )
    if not temperature > 0:
        raise CheckpointFormatError(f"--gate-temperature {temperature} is not positive; their code uses 2")
    layers = sum(1 for k in sd if k.startswith("audio_self.rnn_1.weight_ih_l") and not k.endswith("_reverse"))
    units = {int(k.split(".")[2]) for k in sd if k.startswith("fusion.units.")}
    return ModelConfig(
        speech_dim=sd["audio_self.fc_1.weight"].shape[1],
        text_dim=sd["text_self.fc_1.weight"].shape[1],
        num_classes=sd["audio_self.fc.weight"].shape[0],
        can_hidden=sd["audio_self.rnn_1.weight_hh_l0"].shape[1],
        gru_layers=layers,
        fusion_dim=sd["fusion.fc_aud.weight"].shape[0],
        fusion_layers=len(units),
        attention_dim=width,
        attention_heads=heads,
        gate="mlp",
        gate_hidden=sd["gate.0.weight"].shape[0],
        gate_temperature=temperature,
        can_dropout=0.0,
    )


class _Reader:
    """Takes tensors from a state_dict by key, in float64."""

    def __init__(self, sd: dict):
        self.sd = sd

    def __call__(self, key: str) -> np.ndarray:
        return self.sd[key].astype(np.float64)

    def dense(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(W [out, in], b [out]) of an nn.Linear."""
        return self(f"{name}.weight"), self(f"{name}.bias")


def _kernel(w: np.ndarray, b: np.ndarray) -> dict:
    return {"kernel": w.T.astype(np.float32), "bias": b.astype(np.float32)}


def _compose(first: tuple, second: tuple) -> tuple:
    """The affine map x ↦ W_2 (W_1 x + b_1) + b_2 as one (W, b)."""
    (w1, b1), (w2, b2) = first, second
    return w2 @ w1, w2 @ b1 + b2


def _attention(read: _Reader, unit: str, streams: list[tuple[str, str, str, str]], width: int) -> dict:
    """Our stacked (speech, text) attention from the authors' per-stream layers: each stream is
    (query FC, key/value FC stem, MultiheadAttention, output FC)."""
    query, key_value, out = [], [], []
    for q_fc, kv_stem, mha, out_fc in streams:
        w_in, b_in = read(f"{unit}.{mha}.in_proj_weight"), read(f"{unit}.{mha}.in_proj_bias")
        in_q, in_k, in_v = ((w_in[i * width : (i + 1) * width], b_in[i * width : (i + 1) * width]) for i in range(3))
        q = _compose(read.dense(f"{unit}.{q_fc}"), in_q)
        k = _compose(read.dense(f"{unit}.{kv_stem.format('k')}"), in_k)
        v = _compose(read.dense(f"{unit}.{kv_stem.format('v')}"), in_v)
        o = _compose(read.dense(f"{unit}.{mha}.out_proj"), read.dense(f"{unit}.{out_fc}"))
        query.append(q)
        key_value.append((np.concatenate([k[0], v[0]]), np.concatenate([k[1], v[1]])))
        out.append(o)
    stack = lambda maps: {
        "kernels": np.stack([w.T for w, _ in maps]).astype(np.float32),
        "biases": np.stack([b for _, b in maps]).astype(np.float32),
    }
    return {"query": stack(query), "key_value": stack(key_value), "out": stack(out)}


def _norms(read: _Reader, unit: str, names: tuple[str, str]) -> dict:
    return {
        "scales": np.stack([read(f"{unit}.{n}.weight") for n in names]).astype(np.float32),
        "biases": np.stack([read(f"{unit}.{n}.bias") for n in names]).astype(np.float32),
    }


def params_from_state_dict(sd: dict, heads: int = 3, temperature: float = 2.0):
    """``(ModelConfig, params)`` of our `MisterE` computing what the authors' `AttentionMoE` with this
    state_dict computes on unpadded conversations; raises `CheckpointFormatError` listing every
    missing, unknown or misshapen key (one per line)."""
    try:
        cfg = _config_from_shapes(sd, heads, temperature)
    except KeyError as err:
        raise CheckpointFormatError(f"is not a state_dict of the authors' AttentionMoE (no key {err})") from None
    except IndexError:
        raise CheckpointFormatError(
            "is not a state_dict of the authors' AttentionMoE (a tensor it reads the "
            "architecture from has too few dimensions)"
        ) from None
    expected = _expected_keys(cfg)
    problems = [f"missing key {k}" for k in sorted(expected - set(sd))]
    problems += [
        f"unknown key {k} (shape {list(sd[k].shape)})"
        for k in sorted(set(sd) - expected)
        if not k.startswith(UNUSED_PREFIXES)
    ]
    if not problems:
        try:
            params = _assemble(_Reader(sd), cfg)
        except ValueError as err:  # two tensors that should compose do not
            raise CheckpointFormatError(f"tensor shapes disagree with each other ({err})") from None
        problems = _shape_problems(cfg, params)
    if problems:
        raise CheckpointFormatError("\n".join(problems))
    return cfg, params


def _expected_keys(cfg) -> set[str]:
    """The keys of the authors' AttentionMoE with the depths of ``cfg``."""
    dense = lambda name: {f"{name}.weight", f"{name}.bias"}
    keys = set()
    for m in ("audio_self", "text_self"):
        for name in ("conv", "conv3", "conv5", "fc_1", "fc"):
            keys |= dense(f"{m}.{name}")
        keys |= {
            f"{m}.rnn_1.{kind}_{name}_l{layer}{d}"
            for kind in ("weight", "bias")
            for name in ("ih", "hh")
            for layer in range(cfg.gru_layers)
            for d in ("", "_reverse")
        }
    for name in ("fc_aud", "fc_text", "fc_aud_self", "fc_text_self", "bn", "fc", "fc_2"):
        keys |= dense(f"fusion.{name}")
    for layer in range(cfg.fusion_layers):
        unit = f"fusion.units.{layer}"
        for name in [f"fc_{s}{p}{x}" for s in ("aud", "asr") for p in "qkv" for x in ("", "_s")] + [
            "fc_text",
            "fc_audio",
            "fc_text_s",
            "fc_aud_s",
            "layer_norm_t",
            "layer_norm_a",
            "layer_norm_t_s",
            "layer_norm_a_s",
        ]:
            keys |= dense(f"{unit}.{name}")
        for mha in ("asr", "aud", "selfaud", "selfasr"):
            keys |= {f"{unit}.multihead_attn_{mha}.in_proj_weight", f"{unit}.multihead_attn_{mha}.in_proj_bias"}
            keys |= dense(f"{unit}.multihead_attn_{mha}.out_proj")
    return keys | dense("gate.0") | dense("gate.2")


def _assemble(read: _Reader, cfg) -> dict:
    can = {}
    for ours, theirs in (("speech", "audio_self"), ("text", "text_self")):
        can[f"{ours}_inception"] = {
            f"conv{k}": {
                "kernel": read(f"{theirs}.{name}.weight").transpose(1, 2, 0).astype(np.float32),
                "bias": read(f"{theirs}.{name}.bias").astype(np.float32),
            }
            for k, name in ((1, "conv"), (3, "conv3"), (5, "conv5"))
        }
        can[f"{ours}_residual"] = _kernel(*read.dense(f"{theirs}.fc_1"))
        can[f"{ours}_head"] = _kernel(*read.dense(f"{theirs}.fc"))
    gru = {}
    for layer in range(cfg.gru_layers):
        for name in ("ih", "hh"):  # streams g = 2m + d: (speech fwd, speech bwd, text fwd, text bwd)
            keys = [f"{m}.rnn_1.{{}}_{name}_l{layer}{d}" for m in ("audio_self", "text_self") for d in ("", "_reverse")]
            gru[f"w_{name}_{layer}"] = np.stack([read(k.format("weight")).T for k in keys]).astype(np.float32)
            gru[f"b_{name}_{layer}"] = np.stack([read(k.format("bias")) for k in keys]).astype(np.float32)
    can["gru"] = gru
    f, a = cfg.fusion_dim, cfg.attention_dim
    multimodal = {
        "speech_projection": _kernel(*read.dense("fusion.fc_aud")),
        "text_projection": _kernel(*read.dense("fusion.fc_text")),
        "speech_residual": _kernel(*read.dense("fusion.fc_aud_self")),
        "text_residual": _kernel(*read.dense("fusion.fc_text_self")),
    }
    for layer in range(cfg.fusion_layers):
        unit = f"fusion.units.{layer}"
        multimodal[f"layer_{layer}"] = {
            "cross_attention": _attention(
                read,
                unit,
                [
                    ("fc_audq", "fc_asr{}", "multihead_attn_aud", "fc_audio"),
                    ("fc_asrq", "fc_aud{}", "multihead_attn_asr", "fc_text"),
                ],
                a,
            ),
            "cross_norm": _norms(read, unit, ("layer_norm_a", "layer_norm_t")),
            "self_attention": _attention(
                read,
                unit,
                [
                    ("fc_audq_s", "fc_aud{}_s", "multihead_attn_selfaud", "fc_aud_s"),
                    ("fc_asrq_s", "fc_asr{}_s", "multihead_attn_selfasr", "fc_text_s"),
                ],
                a,
            ),
            "self_norm": _norms(read, unit, ("layer_norm_a_s", "layer_norm_t_s")),
        }
    speech_first = np.concatenate([np.arange(f, 2 * f), np.arange(f)])  # their [text; audio] → our [speech; text]
    multimodal["classifier_norm"] = {
        "scale": read("fusion.bn.weight")[speech_first].astype(np.float32),
        "bias": read("fusion.bn.bias")[speech_first].astype(np.float32),
    }
    w, b = read.dense("fusion.fc")
    multimodal["classifier_hidden"] = _kernel(w[:, speech_first], b)
    multimodal["classifier_out"] = _kernel(*read.dense("fusion.fc_2"))
    gate = {"hidden": _kernel(*read.dense("gate.0")), "out": _kernel(*read.dense("gate.2"))}
    return {"can": can, "multimodal": multimodal, "gate": gate}


def _shape_problems(cfg, params) -> list[str]:
    want = {
        jax.tree_util.keystr(p): tuple(s.shape) for p, s in jax.tree_util.tree_flatten_with_path(param_shapes(cfg))[0]
    }
    got = {jax.tree_util.keystr(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    return [
        f"{name}: shape {list(got.get(name, ()))} where the architecture read from the checkpoint needs {list(shape)}"
        for name, shape in want.items()
        if got.get(name) != shape
    ]
