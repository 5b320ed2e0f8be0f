"""``python -m mister_jax.predict --stream``: a causal run's predictions, one utterance at a time.

    python -m mister_jax.predict --stream --run DIR [--seed S] < utterances.jsonl
    python -m mister_jax.predict --stream --run DIR --dataset NAME [--features ROOT] [--split test]

Without ``--dataset`` the utterances come from stdin, one JSON object per line::

    {"conversation_id": "call-7", "utterance_id": "call-7_3", "speaker": "A",
     "speech": [Ds numbers], "text": [Dt numbers], "label": "happy"}

``speaker`` and ``label`` are optional (``speaker`` is read past: the model does not use speakers;
``label`` is a class name of the run, echoed as the output's label); a text-only run needs no
``speech``. Each conversation's lines come in dialogue order; conversations may interleave. The line
``{"conversation_id": "call-7", "end": true}`` forgets a finished conversation's state. With
``--dataset`` the store's split is read row by row in store order instead.

Each utterance's prediction line (the fields of ``python -m mister_jax.predict``, DESIGN §6) is
printed to stdout and flushed as soon as the utterance is read. Per conversation the stream keeps
what `mister_jax.stream` carries (the convolutions' window, the GRU states, the attentions' keys and
values), so the past is never recomputed. A bad line stops the stream with one line naming it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import IO, Iterable, Iterator

import jax
import numpy as np

from mister_jax.calibration import read_temperatures, scale_heads
from mister_jax.config import ModelConfig
from mister_jax.errors import UsageError
from mister_jax.input_pipeline import SplitData, load_split, required_modalities
from mister_jax.predict import choose_seed, load_run, open_run_and_store, prediction_record, restore_best_params
from mister_jax.runtime.compile_cache import enable_compilation_cache
from mister_jax.stream import ensure_capacity, init_state, jitted_stream_step

# (conversation_id, utterance_id, label id or -1, {modality: [D]}); features None ends the conversation.
Utterance = tuple[str, str | None, int, dict | None]


def _identifier(obj: dict, key: str, where: str) -> str:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        raise UsageError(f'{where}: no "{key}" (a string) — give every utterance its {key}')
    return str(value)


def _embedding(obj: dict, modality: str, dim: int, where: str) -> np.ndarray:
    value = obj.get(modality)
    try:
        x = np.asarray(value, np.float32)
    except (TypeError, ValueError):
        x = np.zeros(0, np.float32)
    if value is None or x.ndim != 1 or x.shape[0] != dim:
        got = "nothing" if value is None else f"shape {list(x.shape)}"
        raise UsageError(
            f'{where}: "{modality}" must be a list of {dim} numbers (the run\'s {modality}_dim), got {got} — '
            f"send the utterance's {modality} embedding from the encoder the run was trained on"
        )
    if not np.all(np.isfinite(x)):
        raise UsageError(f'{where}: "{modality}" holds NaN or infinite values — send a finite embedding')
    return x


def jsonl_utterances(lines: Iterable[str], model_cfg: ModelConfig, names: list, source: str = "<stdin>"):
    """Yields the `Utterance` of every line of ``lines`` (the module docstring's format), checked;
    a bad line raises `UsageError` naming ``source:LINE``, what is wrong and the fix."""
    dims = {"speech": model_cfg.speech_dim, "text": model_cfg.text_dim}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{source}:{number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise UsageError(f"{where}: not JSON ({err.msg}) — send one JSON object per line") from None
        if not isinstance(obj, dict):
            raise UsageError(f"{where}: not a JSON object — send one object per utterance")
        conversation = _identifier(obj, "conversation_id", where)
        if obj.get("end") is True:
            yield conversation, None, -1, None
            continue
        utterance = _identifier(obj, "utterance_id", where)
        features = {m: _embedding(obj, m, dims[m], where) for m in required_modalities(model_cfg.variant)}
        label = obj.get("label")
        if label is not None and label not in names:
            raise UsageError(f"{where}: label {label!r} is not one of the run's classes {names} — drop it or use one")
        yield conversation, utterance, (-1 if label is None else names.index(label)), features


def store_utterances(data: SplitData, modalities: tuple[str, ...]) -> Iterator[Utterance]:
    """Yields a split's rows as `Utterance`s in store order, each conversation ended after its last."""
    for start, length in zip(data.starts, data.lengths):
        conversation = str(data.conversation_ids[start])
        for row in range(int(start), int(start + length)):
            features = {m: data.features[m][row] for m in modalities}
            yield conversation, str(data.utterance_ids[row]), int(data.labels[row]), features
        yield conversation, None, -1, None


def stream_predictions(
    params, model_cfg: ModelConfig, utterances: Iterable[Utterance], names: list, out: IO[str], temperatures=None
):
    """Writes (and flushes) every utterance's prediction line to ``out`` as soon as it is read, one
    `mister_jax.stream` state per open conversation, the heads ``temperatures`` names (``{head: T}``)
    temperature-scaled; returns the number of predictions."""
    step = jitted_stream_step(model_cfg)
    conversations = {}  # conversation_id -> (utterances seen, StreamState)
    count = 0
    for conversation, utterance, label, features in utterances:
        if features is None:
            conversations.pop(conversation, None)
            continue
        seen, state = conversations.get(conversation) or (0, init_state(model_cfg))
        state, probs = step(params, ensure_capacity(state, seen + 1), features)
        conversations[conversation] = (seen + 1, state)
        out.write(
            json.dumps(
                prediction_record(
                    conversation, utterance, label, names, scale_heads(jax.device_get(probs), temperatures)
                )
            )
            + "\n"
        )
        out.flush()
        count += 1
    return count


def run(args: argparse.Namespace) -> int:
    """``--stream``: the checks, then the stream; a bidirectional run is refused before anything loads."""
    run_dir = Path(args.run)
    if args.out is not None:
        raise UsageError(
            f"--out {args.out}: --stream prints each prediction to stdout as it is made — redirect it (> {args.out})"
        )
    config = load_run(run_dir)
    model_cfg = ModelConfig(**config["model"])
    if not model_cfg.causal:
        raise UsageError(
            f"--run {run_dir}: a bidirectional run (causal=false) needs later utterances for every prediction, "
            "so it cannot stream — train one with --set causal=true"
        )
    names = list(config["label_names"])
    if args.dataset is None:
        utterances = jsonl_utterances(iter(sys.stdin.readline, ""), model_cfg, names)
    else:
        _, model_cfg, store = open_run_and_store(run_dir, args.dataset, args.features, args.split)
        modalities = required_modalities(model_cfg.variant)
        utterances = store_utterances(load_split(store, args.split, modalities), modalities)
    seed = choose_seed(run_dir, config, args.seed)
    enable_compilation_cache(args.jax_cache)
    params = jax.device_put(restore_best_params(run_dir, model_cfg, seed))
    try:
        temperatures = read_temperatures(run_dir, seed) if args.temperature_scaling else None
        count = stream_predictions(params, model_cfg, utterances, names, sys.stdout, temperatures)
    except KeyboardInterrupt:
        print("interrupted; the predictions printed so far stand", file=sys.stderr)
        return 130
    print(f"streamed {count} predictions of seed {seed}", file=sys.stderr)
    return 0
