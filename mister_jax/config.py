"""Frozen configurations of a MiSTER-E run: the model (DESIGN §3), its losses (§4) and the training
protocol (§5), each validated on construction.

The fields default to the paper's values; the per-dataset presets (Sec. 4.2) are in `mister_jax.configs`.
"""

from __future__ import annotations

import dataclasses

VARIANTS = ("mister-e", "feat-moe", "no-loss-moe", "monolithic", "text-only")
INITS = ("torch", "flax")
GATES = ("fc", "mlp")
DTYPES = ("float32", "bfloat16")
CONTRASTIVE_SCOPES = ("conversation", "batch")
KL_FORMS = ("directional", "symmetric")
BATCHINGS = ("sorted", "shuffled", "random", "bucketed")
ON_NONFINITE = ("stop", "skip-step")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"mister_jax/config.py: {name}={value!r} is not one of {choices}; pick one of them.")


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"mister_jax/config.py: {name}={value!r} must be > 0; pass a positive value.")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of `mister_jax.model.MisterE`.

    Attributes:
      speech_dim, text_dim: utterance embedding sizes D of the two modalities.
      num_classes: C.
      can_hidden: GRU hidden size H per direction of the context addition networks (Eq. 3–4).
      gru_layers: L, stacked bidirectional GRU layers (3 for IEMOCAP/MOSI, 2 for MELD).
      can_dropout: dropout of the context addition networks.
      fusion_dim: Hf, width of the multimodal network (Eq. 5–9).
      fusion_layers: cross/self-attention layers of the multimodal network.
      attention_dim: query/key/value width of every multi-head attention.
      attention_heads: heads of every multi-head attention.
      fusion_dropout: dropout on each attention sub-layer's output in the multimodal network, before its
        residual (the paper's "dropout 0.5 in the fusion network", placed as the authors' code does).
      attention_dropout: dropout on the attention probabilities of every multi-head attention.
      modality_dropout: probability, per training conversation, that one of its two modalities is
        replaced by zeros (`mister_jax.augmentation`; 0 in the paper).
      gate: "fc" (paper, Eq. 10) or "mlp" (authors' code: 3C → gate_hidden → 3).
      gate_hidden: hidden width of the "mlp" gate.
      gate_temperature: β = softmax(g / gate_temperature) (authors' code uses 2 with the "mlp" gate).
      variant: "mister-e", "feat-moe", "no-loss-moe", "monolithic" or "text-only" (see model.py).
      dtype: compute dtype of matmuls and convolutions ("float32" or "bfloat16"); parameters stay float32.
      init: initial weights: "torch" (PyTorch's defaults, as the paper trained) or "flax" (flax's
        defaults); see `mister_jax.layers`.
      causal: every prediction sees its utterance and the ones before it only, for live conversations:
        forward-only GRUs (the CANs' representations are then H wide, not 2H), temporal convolutions
        over past and present utterances, and attention masked to past and present keys (see
        model.py); `mister_jax.stream` then predicts utterance by utterance. False in the paper.
    """

    speech_dim: int = 2048
    text_dim: int = 2048
    num_classes: int = 6
    can_hidden: int = 512
    gru_layers: int = 3
    can_dropout: float = 0.2
    fusion_dim: int = 1024
    fusion_layers: int = 4
    attention_dim: int = 120
    attention_heads: int = 4
    fusion_dropout: float = 0.5
    attention_dropout: float = 0.1
    modality_dropout: float = 0.0
    gate: str = "fc"
    gate_hidden: int = 10
    gate_temperature: float = 1.0
    variant: str = "mister-e"
    dtype: str = "float32"
    init: str = "torch"
    causal: bool = False

    def __post_init__(self):
        _check_choice("variant", self.variant, VARIANTS)
        _check_choice("gate", self.gate, GATES)
        _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("init", self.init, INITS)
        for name in (
            "speech_dim",
            "text_dim",
            "can_hidden",
            "gru_layers",
            "fusion_dim",
            "fusion_layers",
            "attention_dim",
            "attention_heads",
            "gate_hidden",
            "gate_temperature",
        ):
            _check_positive(name, getattr(self, name))
        if self.num_classes < 2:
            raise ValueError(
                f"mister_jax/config.py: num_classes={self.num_classes} must be >= 2; pass the label count."
            )
        if self.attention_dim % self.attention_heads:
            raise ValueError(
                f"mister_jax/config.py: attention_dim={self.attention_dim} is not divisible by "
                f"attention_heads={self.attention_heads}; pick sizes where it is."
            )
        for name in ("can_dropout", "fusion_dropout", "attention_dropout", "modality_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"mister_jax/config.py: {name}={getattr(self, name)} must lie in [0, 1).")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Weights of the training objective (Eq. 12–19).

    Attributes:
      gamma: focal-loss focusing parameter γ (Eq. 19); 0 gives cross-entropy.
      lambda_con: λ, weight of the supervised contrastive loss in L_multi (Eq. 15).
      alpha_kl: α, weight of the KL consistency loss in L_moe (Eq. 16).
      temperature: τ of the supervised contrastive loss (Eq. 14).
      contrastive_scope: "conversation" (paper: pairs within one conversation) or "batch" (authors' code:
        all conversations of a batch pooled into one matrix).
      kl_form: "directional" (paper, Eq. 17: KL(p^m ‖ p^s) + KL(p^m ‖ p^t)) or "symmetric" (authors' code:
        symmetric KL averaged over the three expert pairs).
    """

    gamma: float = 3.0
    lambda_con: float = 2.0
    alpha_kl: float = 0.1
    temperature: float = 1.0
    contrastive_scope: str = "conversation"
    kl_form: str = "directional"

    def __post_init__(self):
        _check_choice("contrastive_scope", self.contrastive_scope, CONTRASTIVE_SCOPES)
        _check_choice("kl_form", self.kl_form, KL_FORMS)
        _check_positive("temperature", self.temperature)
        for name in ("gamma", "lambda_con", "alpha_kl"):
            if getattr(self, name) < 0:
                raise ValueError(f"mister_jax/config.py: {name}={getattr(self, name)} must be >= 0.")


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
        per seed and epoch, drawn in pools sorted by length); see `mister_jax.batching`.
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
        _check_choice("batching", self.batching, BATCHINGS)
        _check_choice("on_nonfinite", self.on_nonfinite, ON_NONFINITE)
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"TrainConfig: val_fraction={self.val_fraction} must lie in (0, 1).")


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything that defines a training run besides the data."""

    model: ModelConfig
    loss: LossConfig
    train: TrainConfig
