"""Text encoder (Sec. 3.2, DESIGN §7): a local causal LM or encoder with LoRA; last hidden states `[B, L, D]`.

Any model `transformers.AutoModel` loads from a folder works: a causal LM (LLaMA, Qwen2, Gemma, ...;
AutoModel gives its decoder stack without the LM head) or a bidirectional encoder (BERT, MiniLM).
GGUF checkpoints load with `gguf_file`. The head pools with attentive statistics over real tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import transformers
from transformers import AutoModel, AutoTokenizer

from encoders_torch.corpora import Utterance
from encoders_torch.encoder import EncoderError, LoraSettings, UtteranceEncoder, attach_lora


class TextEncoder(UtteranceEncoder):
    """Transcript (optionally formatted with `template`, fields `{text}` and `{speaker}`) → token states."""

    kind = "text"
    pooling = "attentive"

    def __init__(
        self,
        model_path: str | Path,
        lora: LoraSettings = LoraSettings(),
        adapter: str | Path | None = None,
        max_length: int = 128,
        template: str = "{text}",
        gguf_file: str | None = None,
        dtype: torch.dtype = torch.float32,
        attn_implementation: str | None = None,
    ):
        """`attn_implementation`: transformers' attention kernel ("sdpa", "eager"; None: its default)."""
        super().__init__()
        model_path = Path(model_path)
        if not model_path.is_dir():
            raise EncoderError(f"--model {model_path}: not a folder — pass a local transformers model folder")
        extra = {"gguf_file": gguf_file} if gguf_file else {}
        kernel = {"attn_implementation": attn_implementation} if attn_implementation else {}
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(model_path), **extra)
            base = AutoModel.from_pretrained(str(model_path), dtype=dtype, **extra, **kernel)
        except (OSError, ValueError) as e:
            raise EncoderError(
                f"--model {model_path}: cannot load ({str(e).splitlines()[0]}) — pass a transformers model folder"
            ) from None
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self.tokenizer.padding_side = "right"
        self.peft_model = attach_lora(base, lora, adapter)
        self.model = base
        self.hidden_size = int(base.config.hidden_size)
        self.max_length = max_length
        self.template = template
        targets = self.peft_model.peft_config["default"].target_modules
        self._source = {
            "model": str(model_path),
            "model_type": base.config.model_type,
            "gguf_file": gguf_file,
            "max_length": max_length,
            "template": template,
            "lora": {
                "r": lora.r,
                "alpha": lora.alpha,
                "dropout": lora.dropout,
                "target_modules": targets if isinstance(targets, str) else sorted(targets),
            },
            "transformers": transformers.__version__,
        }

    def _text(self, utterance: Utterance) -> str:
        return self.template.format(text=utterance.transcript or "", speaker=utterance.speaker)

    def length(self, utterance: Utterance) -> float:
        """The tokens `collate` gives the utterance (after truncation), so that batches sorted by it pad
        least; characters are a poorer proxy (docs/BENCHMARKS.md, embedding extraction)."""
        ids = self.tokenizer(self._text(utterance), truncation=True, max_length=self.max_length)["input_ids"]
        return float(len(ids))

    def collate(self, utterances: Sequence[Utterance]) -> dict[str, torch.Tensor]:
        tokens = self.tokenizer(
            [self._text(u) for u in utterances],
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return out.last_hidden_state, batch["attention_mask"].bool()

    def source(self) -> dict:
        return dict(self._source)
