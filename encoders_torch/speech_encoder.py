"""Speech encoder (Sec. 3.2, DESIGN §7): a speech LLM prompted with the utterance audio.

The paper used SALMONN-7B; the authors' public code (`train_salmonn.py`) fine-tunes Qwen2-Audio-7B,
which is the one implemented here.

`Qwen2AudioSpeechEncoder` wraps transformers' `Qwen2AudioForConditionalGeneration` (Whisper-style
audio encoder → linear projector → Qwen2 LLM). LoRA adapts the LLM's attention only; the projector is
trained in full (peft `modules_to_save`, saved with the adapter); the audio encoder stays frozen.
Input: `<|audio_bos|>` + one `<|AUDIO|>` token per audio frame + `<|audio_eos|>` + prompt. The head
takes the mean of the LLM's last hidden states over real positions.

With `use_audio_cache(ROOT)` the frozen audio tower runs once per clip: a batch with a clip not yet
cached goes through transformers' forward and the tower's output rows of its clips (the projector's
input) are saved (encoders_torch.audio_cache); a batch whose clips are all cached skips the audio
loading, the mel features and the tower, and feeds the cached rows to the projector, whose outputs
take the places of the `<|AUDIO|>` tokens as transformers places them. The tower then stays in eval
mode while training, so that what is cached is what every epoch would compute.

Other speech LLMs (e.g. SALMONN: Whisper + BEATs → Q-Former → Vicuna, LoRA also on the Q-Former)
plug in by subclassing `UtteranceEncoder` and adding a builder to `SPEECH_ENCODERS` under their
config `model_type`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import transformers
from transformers import AutoConfig, AutoTokenizer, Qwen2AudioForConditionalGeneration, WhisperFeatureExtractor

from encoders_torch.audio import SAMPLE_RATE, audio_seconds, load_audio
from encoders_torch.audio_cache import AudioTowerCache, model_key
from encoders_torch.corpora import Utterance
from encoders_torch.encoder import EncoderError, LoraSettings, UtteranceEncoder, attach_lora

DEFAULT_PROMPT = "What emotion does the speaker express?"
_HOP = 160  # Whisper features: 10 ms per mel frame at 16 kHz


class Qwen2AudioSpeechEncoder(UtteranceEncoder):
    kind = "speech"
    pooling = "mean"

    def __init__(
        self,
        model_path: str | Path,
        lora: LoraSettings = LoraSettings(),
        adapter: str | Path | None = None,
        max_seconds: float = 30.0,
        prompt: str | None = None,
        dtype: torch.dtype = torch.float32,
        attn_implementation: str | None = None,
    ):
        """`attn_implementation`: transformers' attention kernel ("sdpa", "eager"; None: its default)."""
        super().__init__()
        model_path = Path(model_path)
        kernel = {"attn_implementation": attn_implementation} if attn_implementation else {}
        model = Qwen2AudioForConditionalGeneration.from_pretrained(str(model_path), dtype=dtype, **kernel)
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_path))
        audio_config = model.config.audio_config
        window_seconds = audio_config.max_source_positions * 2 * _HOP / SAMPLE_RATE
        if (model_path / "preprocessor_config.json").is_file():
            self.features = WhisperFeatureExtractor.from_pretrained(str(model_path))
        else:
            self.features = WhisperFeatureExtractor(
                feature_size=audio_config.num_mel_bins,
                sampling_rate=SAMPLE_RATE,
                hop_length=_HOP,
                chunk_length=int(window_seconds),
                n_fft=400,
            )
        if self.features.nb_max_frames != audio_config.max_source_positions * 2:
            raise EncoderError(
                f"--model {model_path}: feature extractor gives {self.features.nb_max_frames} mel frames, the audio "
                f"encoder expects {audio_config.max_source_positions * 2} — fix preprocessor_config.json"
            )
        self.max_seconds = min(max_seconds, window_seconds)
        self.audio_token_id = int(model.config.audio_token_id)
        self.prompt = prompt if prompt is not None else DEFAULT_PROMPT
        self.prefix_ids = self._ids("<|audio_bos|>")
        self.suffix_ids = self._ids("<|audio_eos|>") + self._ids(self.prompt)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.peft_model = attach_lora(
            model, lora, adapter, scope="language_model", modules_to_save=["multi_modal_projector"]
        )
        self.model = model
        self.cache: AudioTowerCache | None = None
        self.hidden_size = int(model.config.text_config.hidden_size)
        self._source = {
            "model": str(model_path),
            "model_type": model.config.model_type,
            "max_seconds": self.max_seconds,
            "prompt": self.prompt,
            "lora": {
                "r": lora.r,
                "alpha": lora.alpha,
                "dropout": lora.dropout,
                "scope": "language_model",
                "trained_in_full": ["multi_modal_projector"],
            },
            "transformers": transformers.__version__,
        }

    def _ids(self, text: str) -> list[int]:
        """Token ids of `text`; special markers the tokenizer lacks contribute nothing."""
        if text.startswith("<|") and text not in self.tokenizer.get_vocab():
            return []
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def length(self, utterance: Utterance) -> float:
        return audio_seconds(utterance.audio) if utterance.audio else 0.0

    def use_audio_cache(self, root: str | Path) -> None:
        """Cache the audio tower's outputs under `root` (module docstring)."""
        settings = {
            "audio_config": self.model.config.audio_config.to_dict(),
            "max_seconds": self.max_seconds,
            "features": self.features.to_dict(),
        }
        self.cache = AudioTowerCache(root, model_key(self.model.model.audio_tower, settings))

    def train(self, mode: bool = True) -> "Qwen2AudioSpeechEncoder":
        super().train(mode)
        if self.cache is not None:
            self.model.model.audio_tower.eval()
        return self

    def _token_rows(self, n_audio: Sequence[int]) -> dict[str, torch.Tensor]:
        """input_ids and attention_mask `[B, L]` of the prompt with `n_audio[i]` audio tokens in row i."""
        rows = [self.prefix_ids + [self.audio_token_id] * int(n) + self.suffix_ids for n in n_audio]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.tensor(row)
            attention_mask[i, : len(row)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def collate(self, utterances: Sequence[Utterance]) -> dict:
        """Token rows and mel features; with the cache, the cached tower rows instead of mel features when
        every clip has them, else the clips to cache (`audio_clips`)."""
        cached = self.cache.load([u.audio for u in utterances]) if self.cache is not None else None
        if cached is not None:
            width = max(len(r) for r in cached)
            features = np.zeros((len(cached), width, cached[0].shape[-1]), np.float32)
            for i, rows in enumerate(cached):
                features[i, : len(rows)] = rows
            return {
                **self._token_rows([len(r) for r in cached]),
                "audio_features": torch.from_numpy(features),
                "audio_mask": torch.arange(width)[None, :] < torch.tensor([len(r) for r in cached])[:, None],
            }
        waves = [load_audio(u.audio, self.max_seconds) for u in utterances]
        features = self.features(
            waves, sampling_rate=SAMPLE_RATE, return_attention_mask=True, padding="max_length", return_tensors="pt"
        )
        mel_mask = features["attention_mask"]
        _, n_audio = self.model.model.audio_tower._get_feat_extract_output_lengths(mel_mask.sum(-1))
        batch = {
            **self._token_rows(n_audio.tolist()),
            "input_features": features["input_features"],
            "feature_attention_mask": mel_mask,
        }
        if self.cache is not None:
            batch["audio_clips"] = [u.audio for u in utterances]
        return batch

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if "audio_features" in batch:
            return self._forward_cached(batch), batch["attention_mask"].bool()
        captured = []
        projector = self.model.model.multi_modal_projector
        hook = projector.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach()))
        try:
            out = self.model.model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                input_features=batch["input_features"].to(self.model.dtype),
                feature_attention_mask=batch["feature_attention_mask"],
            )
        finally:
            hook.remove()
        if "audio_clips" in batch:
            n_audio = (batch["input_ids"] == self.audio_token_id).sum(-1).tolist()
            tower = captured[0].float().cpu().numpy()
            for clip, rows, n in zip(batch["audio_clips"], tower, n_audio):
                self.cache.save(clip, rows[:n])
        return out.last_hidden_state, batch["attention_mask"].bool()

    def _forward_cached(self, batch: dict) -> torch.Tensor:
        """The LLM's last hidden states from cached tower rows: projector → the `<|AUDIO|>` places → LLM."""
        inner = self.model.model
        embeds = inner.get_input_embeddings()(batch["input_ids"])
        tower = batch["audio_features"].to(inner.multi_modal_projector.linear.weight.dtype)
        audio = inner.multi_modal_projector(tower)[batch["audio_mask"]]
        places = (batch["input_ids"] == self.audio_token_id)[..., None]
        embeds = embeds.masked_scatter(places, audio.to(embeds.dtype))
        out = inner.language_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"])
        return out.last_hidden_state

    def source(self) -> dict:
        return dict(self._source)


SPEECH_ENCODERS: dict[str, Callable[..., UtteranceEncoder]] = {"qwen2_audio": Qwen2AudioSpeechEncoder}


def build_speech_encoder(
    model_path: str | Path,
    lora: LoraSettings = LoraSettings(),
    adapter: str | Path | None = None,
    max_seconds: float = 30.0,
    prompt: str | None = None,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = None,
) -> UtteranceEncoder:
    """The speech encoder registered for the model's config `model_type`."""
    if not Path(model_path).is_dir():
        raise EncoderError(f"--model {model_path}: not a folder — pass a local speech LLM folder")
    try:
        model_type = AutoConfig.from_pretrained(str(model_path)).model_type
    except (OSError, ValueError) as e:
        raise EncoderError(f"--model {model_path}: no usable config.json ({str(e).splitlines()[0]})") from None
    if model_type not in SPEECH_ENCODERS:
        raise EncoderError(
            f"--model {model_path}: model_type {model_type!r} has no speech encoder "
            f"(known: {sorted(SPEECH_ENCODERS)}) — "
            "use a Qwen2-Audio checkpoint, or add an UtteranceEncoder to speech_encoder.SPEECH_ENCODERS"
        )
    return SPEECH_ENCODERS[model_type](
        model_path,
        lora,
        adapter,
        max_seconds=max_seconds,
        prompt=prompt,
        dtype=dtype,
        attn_implementation=attn_implementation,
    )
