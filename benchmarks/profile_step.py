"""Where the time of one JAX training step goes, and the speed levers measured one by one.

    .venv/bin/python benchmarks/profile_step.py [--dims paper|tiny] [--length T] [--repeats N]

Each part is jitted on its own and timed forward + backward (value_and_grad of a scalar of its
output) on one [B, T] batch of the IEMOCAP preset: the temporal-inception convolutions, the GRU
recurrences (`mister_jax.ops.gru.BidirectionalGRU`), the multimodal network, the losses, the optimizer
update, and the whole step (`mister_jax.steps.train_step`, jitted with the state donated). Levers, each
against its baseline:

  gru:       the recurrences written naive / hoisted / fused (`benchmarks/levers.py`, gradients by
             JAX's autodiff) against `mister_jax.ops.gru` (fused, hand-written backward pass);
  dropout:   `flax.linen.Dropout` (one 32-bit draw per element) against `mister_jax.ops.dropout`
             (two 16-bit draws per 32-bit word), on the activations the model drops per step;
  donation:  the step with and without donated state buffers;
  sync:      `block_until_ready` after every step vs once at the end of 8 steps;
  xla-opt0:  the step compiled with XLA_FLAGS=--xla_backend_optimization_level=0 (compile and run
             time, measured in a subprocess because XLA reads its flags at start-up).

Then the whole step once more under `jax.profiler`: the self time of every XLA op, summed by the part
of the model its name scope says it belongs to (`TRACE_GROUPS`) — the figures that add up to the step.

Prints one line per figure and writes benchmarks/results/profile_step.json.
"""

from __future__ import annotations

import argparse
import functools
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from common import DIMS, RESULTS_DIR, emit, machine_info, make_corpus, parse_result, write_result  # noqa: E402

FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
GRU_PART = "GRU recurrences (2 modalities x L-layer BiGRU, mister_jax.ops.gru)"
WHOLE_STEP = "whole train step (steps.train_step)"


def timed(fn, *args, repeats: int) -> dict:
    """Compile seconds (first call) and median run milliseconds of a jitted `fn(*args)`."""
    import jax

    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    compile_s = time.perf_counter() - t0
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        runs.append(time.perf_counter() - t0)
    return {"compile_s": compile_s, "ms": 1e3 * float(np.median(runs))}


def configs(dims):
    """(ModelConfig, LossConfig, TrainConfig) of the IEMOCAP preset at the benchmark's dims, float32."""
    from train_epoch import iemocap_config

    config = iemocap_config(dims, "float32", None)
    return config.model, config.loss, config.train


def donated_train_step(model_cfg, loss_cfg, train_cfg):
    """`mister_jax.steps.train_step` of one seed, jitted with its state donated (as the trainer runs it)."""
    import jax

    from mister_jax.steps import make_optimizer, train_step

    step = functools.partial(train_step, model_cfg=model_cfg, loss_cfg=loss_cfg, tx=make_optimizer(train_cfg))
    return jax.jit(step, donate_argnums=0)


def example_batch(dims, length: int):
    """A [B, T] batch of the synthetic corpus: the B longest conversations that fit in T."""
    from mister_jax.input_pipeline import Batch

    corpus = make_corpus(dims)
    fits = np.flatnonzero(corpus.lengths <= length)
    chosen = fits[np.argsort(corpus.lengths[fits])[::-1][: dims.batch_size]]
    b, t = dims.batch_size, length
    speech = np.zeros((b, t, dims.speech_dim), np.float32)
    text = np.zeros((b, t, dims.text_dim), np.float32)
    labels = np.full((b, t), -1, np.int32)
    mask = np.zeros((b, t), bool)
    for row, c in enumerate(chosen):
        s, n = corpus.starts[c], corpus.lengths[c]
        speech[row, :n], text[row, :n] = corpus.speech[s : s + n], corpus.text[s : s + n]
        labels[row, :n], mask[row, :n] = corpus.labels[s : s + n], True
    return Batch(speech, text, labels, mask)


def profile_parts(args) -> dict:
    """Forward + backward time of each part, the optimizer, the whole step and the levers."""
    import jax
    import jax.numpy as jnp
    import levers as gru_levers
    import optax

    from mister_jax.losses import total_loss
    from mister_jax.model import MisterE, MultimodalNetwork, TemporalInception
    from mister_jax.ops.gru import BidirectionalGRU
    from mister_jax.steps import create_train_state, loss_fn, make_optimizer, seed_keys, train_step

    dims = DIMS[args.dims]
    model_cfg, loss_cfg, train_cfg = configs(dims)
    batch = jax.device_put(example_batch(dims, args.length))
    mask = batch.mask
    key = jax.random.key(0)
    width, hidden = 2 * model_cfg.can_hidden, model_cfg.can_hidden
    rep = functools.partial(timed, repeats=args.repeats)
    parts = {}

    def grad_of(module, *inputs, **kw):
        params = module.init({"params": key, "dropout": key}, *inputs, **kw)["params"]
        scalar = lambda p, *xs: jnp.sum(
            jnp.square(
                module.apply({"params": p}, *xs, rngs={"dropout": key}, **kw)
                if not isinstance(module, MultimodalNetwork)
                else module.apply({"params": p}, *xs, rngs={"dropout": key}, **kw)[3]
            )
        )
        return rep(jax.jit(jax.value_and_grad(scalar, argnums=(0,))), params, *inputs)

    inception = TemporalInception(width)
    parts["inception convolutions (2 modalities)"] = grad_of(inception, batch.speech, mask)
    parts["inception convolutions (2 modalities)"]["ms"] *= 2
    gru_in = jnp.zeros((2,) + mask.shape + (width,), jnp.float32) + 0.1
    parts[GRU_PART] = grad_of(BidirectionalGRU(hidden, model_cfg.gru_layers), gru_in, mask)
    parts["multimodal network"] = grad_of(
        MultimodalNetwork(model_cfg), batch.speech, batch.text, mask, deterministic=False
    )

    state = create_train_state(model_cfg, train_cfg, 0)
    outputs = MisterE(model_cfg).apply(
        {"params": state.params}, batch.speech, batch.text, mask, deterministic=False, rngs={"dropout": key}
    )
    loss_only = lambda out: total_loss(
        out, jnp.maximum(batch.labels, 0), mask & (batch.labels >= 0), loss_cfg, model_cfg.variant
    )[0]
    parts["losses (Eq. 18)"] = rep(jax.jit(jax.value_and_grad(loss_only)), outputs)
    tx = make_optimizer(train_cfg)
    update = jax.jit(lambda g, s, p: optax.apply_updates(p, tx.update(g, s, p)[0]))
    parts["optimizer (clip + Adam)"] = rep(update, state.params, state.opt_state, state.params)
    grad_fn = jax.jit(jax.value_and_grad(lambda p: loss_fn(p, batch, key, model_cfg, loss_cfg)[0]))
    parts["model + losses forward+backward"] = rep(grad_fn, state.params)

    dropout_key = seed_keys(0)[1]
    train = donated_train_step(model_cfg, loss_cfg, train_cfg)
    t0 = time.perf_counter()
    compiled = train.lower(state, batch, dropout_key).compile()
    step_compile = time.perf_counter() - t0
    work = create_train_state(model_cfg, train_cfg, 0)

    def steps(n: int, sync_each: bool):
        nonlocal work
        t0 = time.perf_counter()
        for _ in range(n):
            work, m = compiled(work, batch, dropout_key)
            if sync_each:
                jax.block_until_ready(m)
        jax.block_until_ready(work)
        return (time.perf_counter() - t0) / n * 1e3

    steps(1, True)
    whole = {"compile_s": step_compile, "ms": float(np.median([steps(1, True) for _ in range(args.repeats)]))}
    parts[WHOLE_STEP] = whole

    levers = {}
    n = max(2, args.repeats)
    levers["sync: block after every step (ms/step)"] = steps(n, True)
    levers["sync: block once at the end (ms/step)"] = steps(n, False)
    plain = jax.jit(functools.partial(train_step, model_cfg=model_cfg, loss_cfg=loss_cfg, tx=tx))
    spare = create_train_state(model_cfg, train_cfg, 0)
    levers["donation: state not donated (ms/step)"] = rep(plain, spare, batch, dropout_key)["ms"]
    levers["donation: state donated (ms/step)"] = whole["ms"]

    gru_params = gru_levers.init_gru(key, 2, model_cfg.gru_layers, width, hidden)
    for name in ("naive", "hoisted", "fused"):
        fn = getattr(gru_levers, name)
        scalar = lambda p, x, fn=fn: jnp.sum(jnp.square(fn(p, x, mask)))
        levers[f"gru {name} (ms fwd+bwd)"] = rep(jax.jit(jax.value_and_grad(scalar)), gru_params, gru_in)["ms"]
    levers["gru mister_jax.ops.gru (ms fwd+bwd)"] = parts[GRU_PART]["ms"]
    levers.update(dropout_levers(model_cfg, mask.shape, rep))
    return {"parts": parts, "levers": levers}


def dropout_levers(model_cfg, batch_shape, rep) -> dict:
    """Forward + backward ms of the dropouts of one step, `flax.linen.Dropout` against ours."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from mister_jax.ops.dropout import Dropout

    b, t = batch_shape
    cfg = model_cfg
    shapes = (
        [((2, b, t, 2 * cfg.can_hidden), cfg.can_dropout)]
        + [((2, b, cfg.attention_heads, t, t), cfg.fusion_dropout)] * (2 * cfg.fusion_layers)
        + [((b, t, cfg.fusion_dim), cfg.fusion_dropout)]
    )
    xs = [jnp.ones(shape) for shape, _ in shapes]
    out = {}
    for name, module in (("flax.linen.Dropout", nn.Dropout), ("mister_jax.ops.dropout", Dropout)):

        def total(xs, key, module=module):
            keys = jax.random.split(key, len(xs))
            return sum(
                jnp.sum(module(rate).apply({}, x, False, rngs={"dropout": k}))
                for x, (_, rate), k in zip(xs, shapes, keys)
            )

        out[f"dropout {name} (ms fwd+bwd)"] = rep(jax.jit(jax.value_and_grad(total)), xs, jax.random.key(0))["ms"]
    return out


# Where each XLA op of the step belongs, by the name scope in its metadata (first match wins).
TRACE_GROUPS = (
    ("GRU recurrences (the scans)", "/can/gru/while"),
    ("GRU input projections and weight gradients", "/can/gru"),
    ("temporal inception", "_inception"),
    ("multimodal network", "/multimodal/"),
    ("CAN residuals, heads, gate", "/can/"),
    ("losses", "(losses)"),
    ("optimizer (clip + Adam)", "/optimizer/"),
)


def _self_times(events: list) -> dict:
    """Self time (µs) per event name: each event's duration minus that of events nested in it."""
    import collections

    totals = collections.Counter()
    by_thread = collections.defaultdict(list)
    for e in events:
        by_thread[(e["pid"], e["tid"])].append(e)
    for thread in by_thread.values():
        thread.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack = []
        for e in thread:
            while stack and stack[-1]["ts"] + stack[-1]["dur"] <= e["ts"]:
                stack.pop()
            if stack:
                totals[stack[-1]["name"]] -= e["dur"]
            totals[e["name"]] += e["dur"]
            stack.append(e)
    return totals


def profile_trace(args) -> dict:
    """The whole train step under `jax.profiler`: self time of every XLA op, grouped by model part."""
    import glob
    import gzip
    import json
    import re
    import tempfile

    import jax

    compiled, state, batch, key, _ = compiled_step(args)
    op_names = dict(re.findall(r'%([\w.\-]+) = .*?op_name="([^"]*)"', compiled.as_text()))
    for _ in range(2):
        state, m = compiled(state, batch, key)
        jax.block_until_ready(m)
    steps = max(2, args.repeats)
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
        t0 = time.perf_counter()
        for _ in range(steps):
            state, m = compiled(state, batch, key)
            jax.block_until_ready(m)
        wall_ms = (time.perf_counter() - t0) / steps * 1e3
        jax.profiler.stop_trace()
        (path,) = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)
        with gzip.open(path) as f:
            events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X" and e["name"] in op_names]
    groups = {name: 0.0 for name, _ in TRACE_GROUPS}
    groups["other model ops"] = groups["other"] = 0.0
    for name, micros in _self_times(events).items():
        scope = op_names[name]
        group = next((g for g, pattern in TRACE_GROUPS if pattern in scope), None)
        group = group or ("other model ops" if "MisterE" in scope else "other")
        groups[group] += micros / steps / 1e3
    return {"traced step (ms, wall)": wall_ms, "ms per group (self time of XLA ops)": groups}


def profile_torch(args) -> dict:
    """The same batch through the PyTorch reference: forward+backward+Adam, and the GRU alone."""
    import torch
    from torch_reference import MisterE, train_step

    dims = DIMS[args.dims]
    b = example_batch(dims, args.length)
    last = int(b.mask.sum(1).max())
    speech, text, mask = (torch.from_numpy(np.ascontiguousarray(x[:, :last])) for x in (b.speech, b.text, b.mask))
    labels = torch.from_numpy(np.maximum(b.labels[:, :last], 0))
    torch.manual_seed(0)
    model = MisterE(dims)
    opt = torch.optim.Adam(model.parameters(), lr=1e-5)
    train_step(model, opt, speech, text, labels, mask)
    runs = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        train_step(model, opt, speech, text, labels, mask)
        runs.append(time.perf_counter() - t0)
    gru_runs = []
    x = torch.randn(speech.shape[0], last, 2 * dims.can_hidden)
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        total = 0
        for can in (model.audio_self, model.text_self):  # the authors run their GRUs over the padded batch
            out, _ = can.rnn_1(x)
            total = total + out.square().sum()
        total.backward()
        gru_runs.append(time.perf_counter() - t0)
    return {
        "torch step (ms, batch padded to its max)": 1e3 * float(np.median(runs)),
        "torch GRU recurrences fwd+bwd (ms)": 1e3 * float(np.median(gru_runs)),
        "torch_padded_length": last,
    }


def compiled_step(args):
    """``(compiled train step, state, batch, dropout key, compile seconds)`` at [B, args.length]."""
    import jax

    from mister_jax.steps import create_train_state, seed_keys

    dims = DIMS[args.dims]
    model_cfg, loss_cfg, train_cfg = configs(dims)
    batch = jax.device_put(example_batch(dims, args.length))
    state = create_train_state(model_cfg, train_cfg, 0)
    train = donated_train_step(model_cfg, loss_cfg, train_cfg)
    key = seed_keys(0)[1]
    t0 = time.perf_counter()
    compiled = train.lower(state, batch, key).compile()
    return compiled, state, batch, key, time.perf_counter() - t0


def profile_fast_compile(args) -> dict:
    """Compile and run time of the whole step with the fast-compile XLA flags (a child process)."""
    import jax

    compiled, state, batch, key, compile_s = compiled_step(args)
    state, m = compiled(state, batch, key)
    jax.block_until_ready(m)
    runs = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        state, m = compiled(state, batch, key)
        jax.block_until_ready(m)
        runs.append(time.perf_counter() - t0)
    return {"compile_s": compile_s, "ms": 1e3 * float(np.median(runs)), "xla_flags": os.environ.get("XLA_FLAGS")}


def child(args, part: str, env_extra: dict | None = None) -> dict:
    """Runs one part in a fresh interpreter (this environment plus `env_extra`)."""
    env = dict(os.environ, **(env_extra or {}))
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--part",
        part,
        "--dims",
        args.dims,
        "--length",
        str(args.length),
        "--repeats",
        str(args.repeats),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=HERE.parent, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"profile part {part} failed:\n{proc.stderr[-3000:]}")
    return parse_result(proc.stdout)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dims", choices=sorted(DIMS), default="paper", help="paper (default) or tiny")
    parser.add_argument("--length", type=int, default=None, help="padded length T (default 56 paper, 8 tiny)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per part (median; default 3)")
    parser.add_argument("--out", default=str(RESULTS_DIR / "profile_step.json"), help="results JSON file")
    parser.add_argument("--part", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.length is None:
        args.length = 56 if args.dims == "paper" else 8
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.part:
        emit(
            {"jax": profile_parts, "torch": profile_torch, "fast": profile_fast_compile, "trace": profile_trace}[
                args.part
            ](args)
        )
        return 0
    result = {
        "dims": args.dims,
        "batch": [DIMS[args.dims].batch_size, args.length],
        "machine": machine_info(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }
    result.update(child(args, "jax"))
    result["torch"] = child(args, "torch")
    result["levers"]["xla-opt0"] = child(args, "fast", {"XLA_FLAGS": FAST_COMPILE_FLAGS})
    result["trace"] = child(args, "trace")
    whole = result["parts"][WHOLE_STEP]["ms"]
    print(
        f"one step at [B, T] = {result['batch']}, dims {args.dims}: {whole:.1f} ms "
        f"(compile {result['parts'][WHOLE_STEP]['compile_s']:.1f} s)"
    )
    for name, p in result["parts"].items():
        print(
            f"  {name}: {p['ms']:.1f} ms fwd+bwd ({100 * p['ms'] / whole:.0f}% of the step), "
            f"compile {p['compile_s']:.1f} s"
        )
    for name, value in result["levers"].items():
        if isinstance(value, dict):
            print(f"  lever {name}: step {value['ms']:.1f} ms, compile {value['compile_s']:.1f} s")
        else:
            print(f"  lever {name}: {value:.1f}")
    for name, value in result["torch"].items():
        print(f"  {name}: {value:.1f}" if isinstance(value, float) else f"  {name}: {value}")
    trace = result["trace"]
    print(f"  traced step: {trace['traced step (ms, wall)']:.1f} ms wall; self time of its XLA ops by part:")
    for name, ms in trace["ms per group (self time of XLA ops)"].items():
        print(f"    {name}: {ms:.1f} ms")
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
