"""Audio loading at 16 kHz mono: `.wav` (PCM) through the stdlib `wave` module, anything else through ffmpeg.

MELD ships its clips as `.mp4`: reading them needs the `ffmpeg` program on PATH (or convert the clips
to `.wav` beside the `.mp4` files; the MELD reader prefers a `.wav` of the same name).
"""

from __future__ import annotations

import shutil
import subprocess
import wave
from math import gcd
from pathlib import Path

import numpy as np
from scipy.signal import resample_poly

SAMPLE_RATE = 16_000
_PCM_DTYPES = {1: np.uint8, 2: np.int16, 4: np.int32}


class AudioError(Exception):
    """An audio file that cannot be read; the message names the file and the fix."""


def load_audio(path: str | Path, max_seconds: float | None = None) -> np.ndarray:
    """Waveform `[S]` float32 in [-1, 1], mono, 16 kHz, truncated to `max_seconds` when given."""
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: missing — check --data-root, or pass --on-missing skip")
    audio = _read_wav(path) if path.suffix.lower() == ".wav" else _read_ffmpeg(path)
    if max_seconds is not None:
        audio = audio[: int(round(max_seconds * SAMPLE_RATE))]
    return audio


def audio_seconds(path: str | Path) -> float:
    """Duration from the wav header; for other formats a size-based estimate (used only to sort batches)."""
    path = Path(path)
    if path.suffix.lower() == ".wav":
        try:
            with wave.open(str(path), "rb") as f:
                return f.getnframes() / f.getframerate()
        except (wave.Error, EOFError, OSError):
            pass
    return path.stat().st_size / 32_000 if path.is_file() else 0.0


def _read_wav(path: Path) -> np.ndarray:
    try:
        with wave.open(str(path), "rb") as f:
            width, channels, rate = f.getsampwidth(), f.getnchannels(), f.getframerate()
            raw = f.readframes(f.getnframes())
    except (wave.Error, EOFError) as e:
        if shutil.which("ffmpeg"):
            return _read_ffmpeg(path)
        raise AudioError(f"{path}: not a PCM wav ({e}) — convert it to 16-bit PCM, or install ffmpeg") from None
    if width == 3:
        bytes3 = np.frombuffer(raw, np.uint8).reshape(-1, 3)
        samples = (
            bytes3[:, 0].astype(np.int32) | bytes3[:, 1].astype(np.int32) << 8 | bytes3[:, 2].astype(np.int32) << 16
        )
        samples = np.where(samples >= 1 << 23, samples - (1 << 24), samples).astype(np.float32) / (1 << 23)
    elif width in _PCM_DTYPES:
        samples = np.frombuffer(raw, _PCM_DTYPES[width]).astype(np.float32)
        samples = (samples - 128.0) / 128.0 if width == 1 else samples / float(2 ** (8 * width - 1))
    else:
        raise AudioError(f"{path}: {8 * width}-bit samples are not supported — convert it to 16-bit PCM")
    audio = samples.reshape(-1, channels).mean(axis=1)
    if rate != SAMPLE_RATE:
        g = gcd(rate, SAMPLE_RATE)
        audio = resample_poly(audio, SAMPLE_RATE // g, rate // g).astype(np.float32)
    return audio.astype(np.float32)


def _read_ffmpeg(path: Path) -> np.ndarray:
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise AudioError(
            f"{path}: reading {path.suffix} audio needs ffmpeg, which is not installed — install it "
            "(apt-get install ffmpeg) or convert the clips to .wav beside them"
        )
    done = subprocess.run(
        [
            ffmpeg,
            "-nostdin",
            "-loglevel",
            "error",
            "-i",
            str(path),
            "-f",
            "s16le",
            "-ac",
            "1",
            "-ar",
            str(SAMPLE_RATE),
            "-",
        ],
        capture_output=True,
    )
    if done.returncode != 0:
        raise AudioError(
            f"{path}: ffmpeg failed ({done.stderr.decode(errors='replace').strip()[:200]}) — check the file"
        )
    return np.frombuffer(done.stdout, np.int16).astype(np.float32) / 32768.0
