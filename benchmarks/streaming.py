"""Per-utterance latency of a causal MiSTER-E on a live conversation, on CPU (#22).

    .venv/bin/python benchmarks/streaming.py [--dims paper|tiny] [--utterances 100] [--warmup 10]
        [--pad-multiple 16] [--out FILE]

The IEMOCAP preset (`mister_jax.configs.iemocap`) at the benchmark's dims with ``causal=true``, random
parameters and one conversation of N random utterances, predicted utterance by utterance two ways:

  stream     `mister_jax.stream`'s jitted step, carrying each layer's state (what
             ``python -m mister_jax.predict --stream`` runs per utterance);
  recompute  the batch causal model on utterances 0..t for each new t, the last prediction kept (the
             prefix padded to the next multiple of ``--pad-multiple``, so that a handful of shapes is
             compiled; every shape is compiled and run once before timing).

Each time is one utterance's wall time up to its probabilities on the host. A warm-up conversation of
``--warmup`` utterances runs first. Prints the median and p95 of both over the N utterances, their
ratio, and the largest difference between the two predictions (the same model: ~1e-7).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from common import DIMS, RESULTS_DIR, machine_info, write_result  # noqa: E402


def causal_config(dims):
    """The iemocap preset's model at ``dims``, causal."""
    from mister_jax.configs import get_config

    names = ("speech_dim", "text_dim", "num_classes", "can_hidden", "gru_layers", "fusion_dim", "fusion_layers")
    sizes = {n: getattr(dims, n) for n in names + ("attention_dim", "attention_heads")}
    return dataclasses.replace(get_config("iemocap").model, causal=True, **sizes)


def percentiles(times: list[float]) -> dict:
    ms = 1e3 * np.asarray(times)
    return {"median_ms": float(np.median(ms)), "p95_ms": float(np.percentile(ms, 95)), "mean_ms": float(ms.mean())}


def run(args) -> dict:
    import jax

    from mister_jax.input_pipeline import Batch
    from mister_jax.params import count_params, init_params
    from mister_jax.steps import predict_step
    from mister_jax.stream import ensure_capacity, init_state, jitted_stream_step

    cfg = causal_config(DIMS[args.dims])
    params = jax.device_put(init_params(cfg, jax.random.key(0)))
    rng = np.random.default_rng(0)
    n = args.utterances
    speech = rng.standard_normal((n, cfg.speech_dim), dtype=np.float32)
    text = rng.standard_normal((n, cfg.text_dim), dtype=np.float32)

    step = jitted_stream_step(cfg)
    capacity = max(n, args.warmup)

    def stream(length: int):
        state, times, probs = init_state(cfg, capacity), [], []
        for t in range(length):
            start = time.perf_counter()
            state, prediction = step(params, ensure_capacity(state, t + 1), {"speech": speech[t], "text": text[t]})
            probs.append(jax.device_get(prediction["moe"]))
            times.append(time.perf_counter() - start)
        return times, np.stack(probs)

    compile_start = time.perf_counter()
    stream(args.warmup)
    stream_warmup_s = time.perf_counter() - compile_start
    stream_times, stream_probs = stream(n)

    batch_step = jax.jit(functools.partial(predict_step, model_cfg=cfg))
    multiple = args.pad_multiple

    def prefix_batch(t: int) -> Batch:
        width = -(-(t + 1) // multiple) * multiple
        pad = lambda x: np.pad(x[: t + 1], ((0, width - t - 1), (0, 0)))[None]
        mask = (np.arange(width) <= t)[None]
        return Batch(pad(speech), pad(text), np.zeros((1, width), np.int32), mask)

    compile_start = time.perf_counter()
    for t in sorted({min(w, n) - 1 for w in range(multiple, n + multiple, multiple)}):
        jax.device_get(batch_step(params, prefix_batch(t)))  # every padded shape compiled and run once
    recompute_warmup_s = time.perf_counter() - compile_start
    recompute_times, recompute_probs = [], []
    for t in range(n):
        start = time.perf_counter()
        out = batch_step(params, prefix_batch(t))
        recompute_probs.append(jax.device_get(out["moe"])[0, t])
        recompute_times.append(time.perf_counter() - start)

    stream_stats, recompute_stats = percentiles(stream_times), percentiles(recompute_times)
    return {
        "dims": args.dims,
        "utterances": n,
        "warmup_utterances": args.warmup,
        "pad_multiple": multiple,
        "params": count_params(params),
        "stream": stream_stats,
        "recompute_prefix": recompute_stats,
        "recompute_over_stream_median": recompute_stats["median_ms"] / stream_stats["median_ms"],
        "recompute_over_stream_total": float(np.sum(recompute_times) / np.sum(stream_times)),
        "stream_warmup_s": stream_warmup_s,
        "recompute_warmup_s": recompute_warmup_s,
        "max_abs_probability_difference": float(np.abs(stream_probs - np.stack(recompute_probs)).max()),
        "machine": machine_info(),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", choices=sorted(DIMS), default="paper")
    parser.add_argument("--utterances", type=int, default=100, help="utterances of the timed conversation")
    parser.add_argument("--warmup", type=int, default=10, help="utterances of the untimed warm-up conversation")
    parser.add_argument("--pad-multiple", type=int, default=16, help="recompute: prefixes padded to this multiple")
    parser.add_argument("--out", default=str(RESULTS_DIR / "streaming.json"))
    args = parser.parse_args(argv)
    result = run(args)
    for name in ("stream", "recompute_prefix"):
        s = result[name]
        print(f"{name:17s} median {s['median_ms']:8.2f} ms   p95 {s['p95_ms']:8.2f} ms   per utterance")
    print(
        f"ratio recompute/stream: median {result['recompute_over_stream_median']:.1f}, "
        f"total {result['recompute_over_stream_total']:.1f}; "
        f"max |Δp| {result['max_abs_probability_difference']:.1e}"
    )
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
