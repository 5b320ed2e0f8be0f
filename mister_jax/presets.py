"""Per-dataset training presets (DESIGN §5; paper Sec. 4.2) and ``--set key=value`` overrides.

A preset is a ``(ModelConfig, LossConfig, TrainConfig)`` triple. Every dataset trains with Adam,
learning rate 1e-5, gradient clipping at global norm 1.0, for 100 epochs; the table of DESIGN §5 fixes
the batch size, λ, α, τ and the GRU depth. ``demo`` is the built-in synthetic store: tiny widths and a
larger learning rate so it trains in seconds on a CPU. Any other name gets the IEMOCAP-like defaults
with the store's own label names.
"""

from __future__ import annotations

import dataclasses
import typing

from mister_jax.config import LossConfig, ModelConfig


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The optimisation protocol.

    Attributes:
      batch_size: conversations per batch.
      learning_rate: Adam step size.
      clip_norm: gradient clipping at this global norm.
      epochs: passes over the training split.
      seeds: number of seeds; seeds are ``0 .. seeds-1``.
      batching: "sorted" (length-sorted batches, least padding), "shuffled" (random composition within
        length buckets), "random" (the authors': random batches per seed and epoch) or "bucketed" (random
        per seed and epoch, drawn in pools sorted by length); see `mister_jax.data`.
      pool_batches: batches per pool of "bucketed" batching (larger: less padding, less random).
      num_buckets: at most this many pad lengths, hence compiled training shapes.
      bucket_multiple: pad lengths are multiples of this.
      checkpoint_every: save the training state every this many epochs (0: not by epoch count).
      checkpoint_minutes: save it after the first epoch that ends this many minutes after the last save
        (or the start of the run; 0: not by time). Either rule triggers a save, and the last epoch
        always does. By time, an interruption costs at most this much training whatever an epoch
        takes, and a big model is not rewritten every epoch (several GB at paper dims with 3 seeds).
      val_fraction: fraction of training conversations carved out as validation when a store has none.
      val_carve_seed: the fixed seed of that carving.
      test_every_epoch: also evaluate the test split after every epoch (test curves in
        ``metrics.jsonl`` and the report); the reported scores are the same either way, those of each
        seed's best-validation parameters, which are scored on test once training ends.
      on_nonfinite: what a step whose loss or gradient norm is NaN or infinite does: "stop" the run
        (exit 2, the last good checkpoint kept, no results) or "skip-step" (the update is dropped and
        counted in ``results.json``).
    """

    batch_size: int = 8
    learning_rate: float = 1e-5
    clip_norm: float = 1.0
    epochs: int = 100
    seeds: int = 3
    batching: str = "bucketed"
    pool_batches: int = 8
    num_buckets: int = 4
    bucket_multiple: int = 2
    checkpoint_every: int = 0
    checkpoint_minutes: float = 10.0
    val_fraction: float = 0.1
    val_carve_seed: int = 0
    test_every_epoch: bool = False
    on_nonfinite: str = "stop"

    def __post_init__(self):
        for name in ("batch_size", "epochs", "seeds", "num_buckets", "bucket_multiple", "pool_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig: {name}={getattr(self, name)} must be >= 1.")
        for name in ("checkpoint_every", "checkpoint_minutes"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig: {name}={getattr(self, name)} must be >= 0.")
        if self.batching not in ("sorted", "shuffled", "random", "bucketed"):
            raise ValueError(f"TrainConfig: batching={self.batching!r} must be 'sorted', 'shuffled', 'random' "
                             "or 'bucketed'.")
        if self.on_nonfinite not in ("stop", "skip-step"):
            raise ValueError(f"TrainConfig: on_nonfinite={self.on_nonfinite!r} must be 'stop' or 'skip-step'.")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"TrainConfig: val_fraction={self.val_fraction} must lie in (0, 1).")


@dataclasses.dataclass(frozen=True)
class Preset:
    """Everything that defines a training run besides the data."""

    model: ModelConfig
    loss: LossConfig
    train: TrainConfig


PAPER_LABELS = {
    "iemocap": ("angry", "happy", "sad", "neutral", "excited", "frustrated"),
    "meld": ("neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger"),
    "mosi": ("negative", "positive"),
    "emorynlp": ("Neutral", "Joyful", "Scared", "Mad", "Peaceful", "Powerful", "Sad"),
}

_PAPER = {  # dataset: (batch, λ, α, τ, GRU layers, variant)
    "iemocap": (8, 2.0, 0.1, 1.0, 3, "mister-e"),
    "meld": (32, 1.0, 1e-3, 0.05, 2, "mister-e"),
    "mosi": (8, 1.0, 0.1, 1.0, 3, "mister-e"),
    "emorynlp": (8, 2.0, 0.1, 1.0, 3, "text-only"),
}

_DEMO_MODEL = dict(can_hidden=32, gru_layers=1, fusion_dim=32, fusion_layers=1, attention_dim=16,
                   attention_heads=2)
_DEMO_TRAIN = dict(learning_rate=3e-3, epochs=20, batch_size=8, num_buckets=2)


AUTHORS_CODE = {  # what the authors' public code trains where it departs from the paper (DESIGN §3, §4)
    "model": dict(attention_heads=3, gate="mlp", gate_temperature=2.0, can_dropout=0.0),
    "loss": dict(contrastive_scope="batch", kl_form="symmetric"),
    "train": dict(batching="random"),
}
STYLES = ("paper", "authors-code")


def get_preset(dataset: str, label_names: typing.Sequence[str] | None = None, style: str = "paper") -> Preset:
    """The preset of ``dataset``; ``label_names`` (from the store) override the paper's classes.

    ``style="authors-code"`` trains what the authors' public code trains (`AUTHORS_CODE`: 3 heads, the
    MLP gate at temperature 2, the batch-pooled contrastive loss, the symmetric KL over the three expert
    pairs, no dropout in the CANs, their fully random batches), with padding masked and the model selected on validation as
    everywhere here (their code picks it on test).
    """
    if style not in STYLES:
        raise ValueError(f"preset style {style!r} is not one of {STYLES}")
    if dataset == "demo":
        labels = tuple(label_names or PAPER_LABELS["iemocap"])
        preset = Preset(ModelConfig(num_classes=len(labels), **_DEMO_MODEL),
                        LossConfig(lambda_con=1.0), TrainConfig(**_DEMO_TRAIN))
    else:
        batch, lam, alpha, tau, layers, variant = _PAPER.get(dataset, _PAPER["iemocap"])
        labels = tuple(label_names or PAPER_LABELS.get(dataset, PAPER_LABELS["iemocap"]))
        preset = Preset(ModelConfig(num_classes=len(labels), gru_layers=layers, variant=variant),
                        LossConfig(lambda_con=lam, alpha_kl=alpha, temperature=tau),
                        TrainConfig(batch_size=batch))
    if style == "authors-code":
        model = dict(AUTHORS_CODE["model"])
        if dataset == "demo":  # the demo's attention width must divide by the authors' 3 heads
            model["attention_dim"] = 3 * (preset.model.attention_dim // 3)
        preset = Preset(dataclasses.replace(preset.model, **model),
                        dataclasses.replace(preset.loss, **AUTHORS_CODE["loss"]),
                        dataclasses.replace(preset.train, **AUTHORS_CODE["train"]))
    return preset


class OverrideError(ValueError):
    """A ``--set`` override that names no field or whose value does not parse."""


_SECTIONS = {"model": ModelConfig, "loss": LossConfig, "train": TrainConfig}


def valid_keys() -> list[str]:
    """Every key ``--set`` accepts (``section.key`` also works)."""
    return [f.name for cls in _SECTIONS.values() for f in dataclasses.fields(cls)]


def _convert(key: str, text: str, kind: typing.Any):
    if kind in (bool, "bool"):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise OverrideError(f"--set {key}={text}: expected true or false")
    try:
        return {"int": int, "float": float, "str": str}.get(kind, kind)(text)
    except (TypeError, ValueError):
        raise OverrideError(f"--set {key}={text}: expected a value of type {getattr(kind, '__name__', kind)}") from None


def apply_overrides(preset: Preset, overrides: typing.Sequence[str]) -> Preset:
    """Applies ``key=value`` (or ``model.key=value`` etc.) strings, converting to each field's type.

    Raises ``OverrideError`` (one line, listing the valid keys for an unknown key) or ``ValueError``
    from the config's own validation.
    """
    changes = {name: {} for name in _SECTIONS}
    for item in overrides:
        if "=" not in item:
            raise OverrideError(f"--set {item}: expected key=value")
        key, text = item.split("=", 1)
        section, _, name = key.rpartition(".")
        sections = [section] if section in _SECTIONS else list(_SECTIONS) if not section else []
        hits = [s for s in sections if name in {f.name for f in dataclasses.fields(_SECTIONS[s])}]
        if not hits:
            raise OverrideError(f"--set {key}: unknown key; valid keys: {', '.join(valid_keys())}")
        for s in hits:
            field = next(f for f in dataclasses.fields(_SECTIONS[s]) if f.name == name)
            changes[s][name] = _convert(key, text.strip(), field.type)
    return Preset(*(dataclasses.replace(getattr(preset, s), **changes[s]) for s in _SECTIONS))
