"""The pluggable encoder interface, LoRA settings and the encoder + head model (DESIGN §7).

An `UtteranceEncoder` turns a batch of utterances into last hidden states `[B, L, D]` and a mask of
real positions `[B, L]`. `TextEncoder` (text_encoder.py) and `Qwen2AudioEncoder` (speech_encoder.py)
implement it; another composition (e.g. SALMONN: Whisper + BEATs + Q-Former + LLM) plugs in by
subclassing it and registering a builder in `speech_encoder.SPEECH_ENCODERS`.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Sequence

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from encoders_torch.corpora import Utterance
from encoders_torch.heads import ClassifierHead

# Attention projections LoRA adapts by default, by the names architectures give them.
_DEFAULT_TARGETS = (("q_proj", "v_proj"), ("query", "value"), ("q_lin", "v_lin"), ("c_attn",))


class EncoderError(Exception):
    """A model or input that cannot be used; the message names the path or flag and the fix."""


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    """LoRA (DESIGN §6): rank 8, α 32, dropout 0.1; `target_modules` None picks the attention q/v projections."""

    r: int = 8
    alpha: int = 32
    dropout: float = 0.1
    target_modules: tuple[str, ...] | None = None


def default_targets(model: nn.Module, scope: str = "") -> list[str]:
    """Leaf names of the attention query/value projections found in `model` (under `scope` if given)."""
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear) and scope in name}
    for candidate in _DEFAULT_TARGETS:
        if all(c in names for c in candidate):
            return list(candidate)
    raise EncoderError(
        f"no attention projections named like {_DEFAULT_TARGETS} in {type(model).__name__} — "
        "pass --lora-targets with the Linear module names to adapt"
    )


def attach_lora(
    model: nn.Module,
    settings: LoraSettings,
    adapter: str | Path | None,
    scope: str = "",
    modules_to_save: Sequence[str] = (),
) -> PeftModel:
    """Injects LoRA into `model` in place: a saved adapter (frozen) or fresh trainable weights.

    With `scope`, only modules whose qualified name contains `scope` are adapted (e.g. the LLM of a
    speech LLM, not its audio encoder). `modules_to_save` are trained in full and saved with the adapter.
    """
    if adapter is not None:
        if not (Path(adapter) / "adapter_config.json").is_file():
            raise EncoderError(
                f"--adapter {adapter}: no adapter_config.json — pass a folder written by a fine-tuning run"
            )
        return PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
    targets = list(settings.target_modules) if settings.target_modules else default_targets(model, scope)
    if scope:
        pattern = rf".*{scope}.*\.({'|'.join(targets)})"
    else:
        pattern = targets
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=pattern,
        modules_to_save=list(modules_to_save) or None,
    )
    try:
        return get_peft_model(model, config)
    except ValueError as e:
        raise EncoderError(f"--lora-targets {targets}: {e} — name Linear modules of this model") from None


class UtteranceEncoder(nn.Module):
    """Interface: utterances → (last hidden states `[B, L, D]`, real-position mask bool `[B, L]`)."""

    kind: str  # "text" | "speech"
    pooling: str  # pooling of the head: "attentive" | "mean"
    hidden_size: int
    peft_model: PeftModel

    def length(self, utterance: Utterance) -> float:
        """A cheap size used to sort utterances into batches of similar length."""
        raise NotImplementedError

    def collate(self, utterances: Sequence[Utterance]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def source(self) -> dict:
        """Provenance for the store manifest."""
        raise NotImplementedError

    def save_adapter(self, directory: str | Path) -> None:
        self.peft_model.save_pretrained(str(directory))

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the transformer layers' activations in the backward pass instead of keeping them.

        Non-reentrant checkpointing: it needs no input that requires grad (the frozen embeddings give
        none) and works under DistributedDataParallel. transformers 5 names it activation checkpointing.
        """
        model = self.peft_model.base_model.model
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def disable_gradient_checkpointing(self) -> None:
        model = self.peft_model.base_model.model
        if hasattr(model, "activation_checkpointing_disable"):
            model.activation_checkpointing_disable()
        else:
            model.gradient_checkpointing_disable()


class EmotionModel(nn.Module):
    """Encoder + classifier head; `forward(batch)` returns (logits `[B, C]`, embedding `[B, E]`)."""

    def __init__(self, encoder: UtteranceEncoder, head: ClassifierHead):
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, mask = self.encoder(batch)
        return self.head(hidden, mask)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


def resolve_device(name: str) -> tuple[torch.device, torch.dtype]:
    """`auto` → CUDA with bfloat16 when present, else CPU with float32; `cpu` / `cuda[:i]` as given."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise EncoderError(f"--device {name}: no CUDA device here — use --device cpu or auto")
    device = torch.device(name)
    return device, torch.bfloat16 if device.type == "cuda" else torch.float32


def file_digest(paths: Sequence[Path]) -> str:
    """sha256 (first 16 hex digits) over the bytes of `paths`, in order."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]
