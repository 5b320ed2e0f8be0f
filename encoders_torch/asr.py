"""Transcripts for the utterances of a custom corpus file that have none, from a local Whisper model.

    python -m encoders_torch.asr CONVERSATIONS.jsonl --model WHISPER_DIR --out FILLED.jsonl
        [--transcripts TRANSCRIPTS.jsonl] [--language en] [--batch-size 8] [--device auto]

Reads the file as `--dataset custom` does (docs/CUSTOM_CORPUS.md; every row needs its clip, since the
speech encoder reads them all), transcribes the audio of every utterance whose `text` is empty or
absent with transformers' `WhisperForConditionalGeneration` (greedy decoding; a clip longer than the
model's window, 30 s for Whisper, is cut into windows transcribed in turn and joined), and leaves the
given transcripts as they are. Writes:

* `FILLED.jsonl`: the same conversations, in dialogue order, with every text filled and audio paths
  absolute, ready for `encoders_torch.extract --dataset custom --data-root FILLED.jsonl`;
* `TRANSCRIPTS.jsonl` (default: `transcripts.jsonl` beside it): one line per utterance,
  `{"conversation_id", "utterance_id", "speaker", "text", "from": "asr" | "file"}`, for reading;
* `asr.json` beside it: which model transcribed how many utterances, with the versions and the date.

A clip in which the model hears no words stops the command with one line per such clip: the text
encoder needs words for every utterance, and only the user can say what they were.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import transformers
from transformers import WhisperForConditionalGeneration, WhisperProcessor

from encoders_torch.audio import SAMPLE_RATE, AudioError, load_audio
from encoders_torch.corpora import Corpus, CorpusError, Utterance
from encoders_torch.custom_corpus import read_custom, write_custom
from encoders_torch.encoder import EncoderError, file_digest, resolve_device


class Whisper:
    """A local Whisper model and its processor: waveforms at 16 kHz → transcripts."""

    def __init__(self, model_dir: str | Path, device: str = "auto", language: str | None = None):
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise EncoderError(f"ASR model {model_dir}: not a folder — pass a local Whisper model folder")
        self.device, dtype = resolve_device(device)
        try:
            self.processor = WhisperProcessor.from_pretrained(str(model_dir))
            self.model = WhisperForConditionalGeneration.from_pretrained(str(model_dir), dtype=dtype)
        except (OSError, ValueError, TypeError) as e:
            raise EncoderError(
                f"ASR model {model_dir}: cannot load a Whisper model and processor ({str(e).splitlines()[0]}) — "
                "pass a folder holding a transformers Whisper checkpoint with its tokenizer and feature extractor"
            ) from None
        self.model.to(self.device).eval()
        self.language = language
        self.window = self.processor.feature_extractor.n_samples  # samples the encoder sees at once
        self.source = {
            "model": str(model_dir.resolve()),
            "model_digest": file_digest(sorted(model_dir.glob("*.json"))),
            "language": language,
            "decoding": "greedy",
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        }

    @torch.no_grad()
    def _windows(self, windows: Sequence[np.ndarray]) -> list[str]:
        features = self.processor.feature_extractor(
            list(windows), sampling_rate=SAMPLE_RATE, return_attention_mask=True, return_tensors="pt"
        )
        extra = {"language": self.language, "task": "transcribe"} if self.language else {}
        ids = self.model.generate(
            features["input_features"].to(self.device, self.model.dtype),
            attention_mask=features["attention_mask"].to(self.device),
            **extra,
        )
        return [t.strip() for t in self.processor.batch_decode(ids, skip_special_tokens=True)]

    def transcribe(self, waves: Sequence[np.ndarray], batch_size: int = 8) -> list[str]:
        """One transcript per waveform; a waveform longer than the window is transcribed window by window."""
        pieces = [
            (i, w[s : s + self.window]) for i, w in enumerate(waves) for s in range(0, max(len(w), 1), self.window)
        ]
        texts = [""] * len(waves)
        for start in range(0, len(pieces), batch_size):
            batch = pieces[start : start + batch_size]
            for (i, _), text in zip(batch, self._windows([w for _, w in batch])):
                texts[i] = f"{texts[i]} {text}".strip()
        return texts


def _lacks_text(u: Utterance) -> bool:
    return not (u.transcript and u.transcript.strip())


def fill_transcripts(
    corpus: Corpus, whisper: Whisper, batch_size: int = 8, log: Callable[[str], None] = print
) -> tuple[Corpus, list[dict]]:
    """``(corpus with a transcript for every utterance, one record per utterance)``: utterances without text
    get Whisper's transcript of their audio; the others keep theirs."""
    every = [u for split in corpus.splits for u in corpus.utterances(split)]
    missing = [u for u in every if _lacks_text(u)]
    log(f"transcribing {len(missing)} of {len(every)} utterances with Whisper")
    heard = dict(zip((u.id for u in missing), whisper.transcribe([load_audio(u.audio) for u in missing], batch_size)))
    silent = [u for u in missing if not heard[u.id]]
    if silent:
        raise CorpusError(
            "\n".join(
                f"{u.audio}: Whisper heard no words in utterance {u.id!r} — write its transcript in the file"
                for u in silent
            )
        )
    records = []

    def filled(conversation_id: str, u: Utterance) -> Utterance:
        text = heard.get(u.id, u.transcript)
        records.append(
            {
                "conversation_id": conversation_id,
                "utterance_id": u.id,
                "speaker": u.speaker,
                "text": text,
                "from": "asr" if u.id in heard else "file",
            }
        )
        return dataclasses.replace(u, transcript=text)

    splits = {
        split: tuple(dataclasses.replace(c, utterances=tuple(filled(c.id, u) for u in c.utterances)) for c in convs)
        for split, convs in corpus.splits.items()
    }
    return dataclasses.replace(corpus, splits=splits), records


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m encoders_torch.asr", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("conversations", help="the custom corpus file (.jsonl or .csv; docs/CUSTOM_CORPUS.md)")
    p.add_argument("--model", required=True, help="local Whisper model folder (transformers)")
    p.add_argument("--out", required=True, help="the filled corpus file to write (.jsonl)")
    p.add_argument("--transcripts", default=None, help="per-utterance transcripts (default: beside --out)")
    p.add_argument("--language", default=None, help="e.g. en (default: the model detects it)")
    p.add_argument("--batch-size", type=int, default=8, help="audio windows per generate call")
    p.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda")
    return p


def run(args: argparse.Namespace, log: Callable[[str], None] = print) -> list[dict]:
    """Reads, transcribes, writes (module docstring); returns the per-utterance records."""
    out = Path(args.out)
    if out.suffix.lower() != ".jsonl":
        raise CorpusError(f"--out {out}: the filled corpus is JSONL — name a .jsonl file")
    corpus = read_custom(args.conversations, require=("audio",))
    whisper = Whisper(args.model, args.device, args.language)
    corpus, records = fill_transcripts(corpus, whisper, args.batch_size, log)
    transcripts = Path(args.transcripts) if args.transcripts else out.with_name("transcripts.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    transcripts.parent.mkdir(parents=True, exist_ok=True)
    _write_text(transcripts, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    record = {
        **whisper.source,
        "conversations": str(Path(args.conversations).resolve()),
        "transcribed": sum(r["from"] == "asr" for r in records),
        "given": sum(r["from"] == "file" for r in records),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    _write_text(transcripts.with_name("asr.json"), json.dumps(record, indent=2) + "\n")
    write_custom(corpus, out)
    log(f"wrote {out} and {transcripts} ({record['transcribed']} transcribed, {record['given']} given)")
    return records


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        run(args)
    except (CorpusError, EncoderError, AudioError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
