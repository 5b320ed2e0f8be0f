"""Embedding-extraction benchmark: utterances/s of the text encoder, batched length-sorted vs one at a time.

    .venv/bin/python benchmarks/extract.py [--size small|tiny] [--utterances N] [--batch-size B]

Builds a small LLaMA from a `transformers` config with a word-level tokenizer trained here (nothing is
downloaded), wraps it in `encoders_torch.TextEncoder` + `ClassifierHead` (LoRA attached, as the
extraction runs it), and embeds real MELD transcripts (`../shared/data/meld/train_sent_emo.csv` when
present, else synthetic sentences of MELD-like lengths) three ways, in inference mode:

  sorted     utterances sorted by their token count, batches of B (what `encoders_torch.extract` does);
  by-chars   sorted by characters instead (the proxy it used before): the sort key's lever;
  shuffled   batches of B in random order (every batch padded to its longest utterance);
  single     one utterance per forward pass (no padding at all).

Prints one line per figure and writes benchmarks/results/extract.json.
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from common import RESULTS_DIR, machine_info, peak_rss_mib, write_result  # noqa: E402

MELD_CSV = HERE.parent.parent / "shared" / "data" / "meld" / "train_sent_emo.csv"
SIZES = {  # LLaMA shapes: hidden, layers, heads, kv heads, intermediate
    "tiny": dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64
    ),
    "small": dict(
        hidden_size=512, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4, intermediate_size=1408
    ),
}


def transcripts(count: int, seed: int = 0) -> tuple[list[str], str]:
    """`count` utterance texts: MELD's training transcripts when available, else synthetic ones."""
    rng = np.random.default_rng(seed)
    if MELD_CSV.exists():
        with open(MELD_CSV, encoding="utf-8", newline="") as f:
            texts = [row["Utterance"] for row in csv.DictReader(f)]
        picked = rng.choice(len(texts), size=min(count, len(texts)), replace=False)
        return [texts[i] for i in picked], str(MELD_CSV)
    words = [f"w{i}" for i in range(500)]
    lengths = np.clip(rng.lognormal(2.2, 0.7, count).astype(int), 1, 60)
    return [" ".join(rng.choice(words, n)) for n in lengths], "synthetic"


def build_model_folder(folder: Path, texts: list[str], size: str) -> Path:
    """Saves a randomly initialised LLaMA of `size` and a word-level tokenizer fitted on `texts`."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel(unk_token="<unk>"))
    raw.normalizer = normalizers.Lowercase()
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>"], vocab_size=8000))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", unk_token="<unk>")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id, **SIZES[size]
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def time_pass(model, utterances, order, batch_size) -> tuple[float, int, int]:
    """(seconds, real tokens, padded tokens) of embedding `utterances` in `order`, `batch_size` at a time."""
    import torch

    real = padded = 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = model.encoder.collate([utterances[i] for i in order[start : start + batch_size]])
            model(batch)
            real += int(batch["attention_mask"].sum())
            padded += int(batch["attention_mask"].numel())
    return time.perf_counter() - t0, real, padded


def run(args) -> dict:
    import torch

    from encoders_torch.corpora import Utterance
    from encoders_torch.encoder import EmotionModel
    from encoders_torch.heads import ClassifierHead, HeadConfig
    from encoders_torch.text_encoder import TextEncoder

    if args.threads:
        torch.set_num_threads(args.threads)
    texts, source = transcripts(args.utterances)
    utterances = [Utterance(id=f"u{i}", speaker="A", transcript=t, audio=None, label=0) for i, t in enumerate(texts)]
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_model_folder(Path(tmp) / "llama", texts, args.size)
        t0 = time.perf_counter()
        encoder = TextEncoder(folder, max_length=args.max_length)
        head = ClassifierHead(
            HeadConfig(
                input_dim=encoder.hidden_size, num_classes=7, pooling="attentive", embedding_dim=args.embedding_dim
            )
        )
        model = EmotionModel(encoder, head).eval()
        load_s = time.perf_counter() - t0
    warm = list(range(min(len(utterances), 2 * args.batch_size)))
    time_pass(model, utterances, warm, args.batch_size)
    lengths = [encoder.length(u) for u in utterances]
    orders = {
        "sorted": np.argsort(lengths, kind="stable"),
        "by-chars": np.argsort([len(t) for t in texts], kind="stable"),
        "shuffled": np.random.default_rng(1).permutation(len(utterances)),
        "single": np.arange(len(utterances)),
    }
    passes = {}
    for name, order in orders.items():
        seconds, real, padded = time_pass(model, utterances, order, 1 if name == "single" else args.batch_size)
        passes[name] = {
            "seconds": seconds,
            "utterances_per_s": len(utterances) / seconds,
            "token_padding_efficiency": real / padded,
        }
    return {
        "size": args.size,
        "model": {k: v for k, v in SIZES[args.size].items()},
        "params": sum(p.numel() for p in model.parameters()),
        "utterances": len(utterances),
        "text_source": source,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "threads": torch.get_num_threads(),
        "load_s": load_s,
        "passes": passes,
        "speedup_sorted_over_single": passes["sorted"]["utterances_per_s"] / passes["single"]["utterances_per_s"],
        "speedup_sorted_over_shuffled": passes["sorted"]["utterances_per_s"] / passes["shuffled"]["utterances_per_s"],
        "speedup_sorted_over_by_chars": passes["sorted"]["utterances_per_s"] / passes["by-chars"]["utterances_per_s"],
        "peak_rss_mib": peak_rss_mib(),
        "machine": machine_info(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small", help="LLaMA size (default small)")
    parser.add_argument("--utterances", type=int, default=512, help="utterances to embed (default 512)")
    parser.add_argument("--batch-size", type=int, default=16, help="batch size of the batched passes (default 16)")
    parser.add_argument("--max-length", type=int, default=128, help="token truncation length (default 128)")
    parser.add_argument("--embedding-dim", type=int, default=2048, help="utterance embedding width (default 2048)")
    parser.add_argument("--threads", type=int, default=0, help="PyTorch threads (default: one per core)")
    parser.add_argument("--out", default=str(RESULTS_DIR / "extract.json"), help="results JSON file")
    args = parser.parse_args(argv)
    if args.utterances < 1 or args.batch_size < 1:
        parser.error("--utterances and --batch-size must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args)
    print(
        f"text encoder: LLaMA {args.size} ({result['params']:,} parameters with head and LoRA), "
        f"{result['utterances']} utterances from {result['text_source']}, batch {args.batch_size}, "
        f"{result['threads']} threads"
    )
    for name, p in result["passes"].items():
        print(
            f"{name}: {p['utterances_per_s']:.1f} utt/s ({p['seconds']:.2f} s), "
            f"token padding efficiency {p['token_padding_efficiency']:.3f}"
        )
    print(
        f"speedup sorted/single: {result['speedup_sorted_over_single']:.2f}x; "
        f"sorted/shuffled: {result['speedup_sorted_over_shuffled']:.2f}x; "
        f"sorted/by-chars: {result['speedup_sorted_over_by_chars']:.2f}x; peak RSS {result['peak_rss_mib']:.0f} MiB"
    )
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
