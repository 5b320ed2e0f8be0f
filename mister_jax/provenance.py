"""Which encoders a run's features came from, and the check that new conversations are encoded alike.

A run directory's ``provenance.json`` (written by `mister_jax.train`) copies, for every modality the run
uses, the store manifest's entry: ``dim``, ``dtype`` and the ``source`` that `encoders_torch.extract`
records, among it the encoder model's folder and ``model_digest`` (sha256 of the folder's JSON files:
config and tokenizer; hashing the weights of an 8B model would cost more than the check is worth), the
trained folder and ``adapter_digest`` (sha256 of the head's weights and config and the adapter's
safetensors, the bytes extract hashes), and the encoding settings (text template and length, speech
prompt and clip length). A run trained before that file existed falls back to its store's manifest.

    python -m mister_jax.provenance --run RUN [--text-adapter DIR] [--speech-adapter DIR]
        [--text-model DIR] [--speech-model DIR] [--allow-mismatch] --args-out DIR

checks the given folders against the run's record (an adapter or model left out is the recorded one),
refuses with one line per mismatch naming it and the fix, and writes, per modality the run uses,
``DIR/MODALITY.args``: the `encoders_torch.extract` arguments that encode as the run's features were
(NUL-separated, for ``mapfile -d ''``). This module needs no JAX, so the check is quick.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

from mister_jax import atomic
from mister_jax.errors import UsageError

PROVENANCE = "provenance.json"
HEAD_FILES = ("head.safetensors", "head_config.json")  # encoders_torch.heads' file names
MODALITIES = ("text", "speech")


def record(store, modalities) -> dict:
    """``provenance.json``'s content for a run on ``store`` (a `bridges.FeatureStore`) using ``modalities``."""
    return {
        "store": str(store.directory.resolve()),
        "modalities": {m: dict(store.modalities[m]) for m in modalities},
    }


def write(workdir: Path, store, modalities) -> None:
    atomic.write_json(Path(workdir) / PROVENANCE, record(store, modalities))


def read(run: Path) -> dict:
    """The run's record: ``provenance.json``, else the manifest of the store ``run_config.json`` names;
    ``"path"`` says which file it was read from."""
    run = Path(run)
    path = run / PROVENANCE
    if not path.is_file():
        try:
            config = json.loads((run / "run_config.json").read_text(encoding="utf-8"))
            manifest_path = Path(config["store"]) / "manifest.json"
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            used = ("text",) if config.get("model", {}).get("variant") == "text-only" else MODALITIES
            modalities = {m: manifest["modalities"][m] for m in used}
            return {"store": config["store"], "modalities": modalities, "path": str(manifest_path)}
        except (OSError, KeyError, TypeError, json.JSONDecodeError):
            raise UsageError(
                f"--run {run}: no {PROVENANCE} and no readable store manifest to say which encoders its "
                "features came from — retrain the run on a store written by encoders_torch.extract"
            ) from None
    try:
        return {**json.loads(path.read_text(encoding="utf-8")), "path": str(path)}
    except (OSError, json.JSONDecodeError) as err:
        raise UsageError(f"{path}: unreadable ({err}) — retrain the run") from None


def _digest(paths) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()[:16]


def adapter_digest(folder: Path) -> str:
    """The ``adapter_digest`` `encoders_torch.extract` records for the trained folder ``folder``."""
    folder = Path(folder)
    return _digest([*(folder / name for name in HEAD_FILES), *sorted((folder / "adapter").glob("*.safetensors"))])


def model_digest(folder: Path) -> str:
    """The ``model_digest`` `encoders_torch.extract` records for the model folder ``folder``."""
    return _digest(sorted(Path(folder).glob("*.json")))


def recorded_model(source: dict) -> str:
    """The model folder a modality's features came from (older stores name it only inside ``encoder``)."""
    return source.get("model") or source.get("encoder", {}).get("model", "")


def check(
    modality: str, entry: dict, adapter: Path | None, model: Path | None, where: str = PROVENANCE
) -> tuple[Path, Path, list[str]]:
    """``(adapter, model, problems)`` for encoding ``modality`` as the run's record ``entry`` says; a folder
    not given is the recorded one. Problems are lines naming the flag, the mismatch and the fix; features
    that no adapter made (e.g. the demo store's) are a `UsageError` naming ``where`` (the record's file)."""
    source = entry.get("source", {})
    if "adapter_digest" not in source:
        raise UsageError(
            f"{where}: the run's {modality} features were not written by encoders_torch.extract (their "
            f"source is {json.dumps(source)}), so no adapter encodes like them — train the run on a store that "
            "encoders_torch.extract wrote"
        )
    adapter = Path(adapter) if adapter is not None else Path(source["adapter"])
    model = Path(model) if model is not None else Path(recorded_model(source))
    flag, fix = f"--{modality}-adapter", "or pass --allow-mismatch to predict anyway"
    problems = []
    missing = [n for n in HEAD_FILES if not (adapter / n).is_file()]
    if missing:
        problems.append(
            f"{flag} {adapter}: no {', '.join(missing)} — pass the trained folder encoders_torch.extract wrote "
            f"for the run's {modality} features ({source['adapter']})"
        )
    elif adapter_digest(adapter) != source["adapter_digest"]:
        problems.append(
            f"{flag} {adapter}: digest {adapter_digest(adapter)}, but the run's {modality} features came from "
            f"adapter {source['adapter']} (digest {source['adapter_digest']}) — pass that folder, or retrain "
            f"the run on features of this adapter, {fix}"
        )
    model_flag = f"--{modality}-model"
    if not model.is_dir():
        problems.append(
            f"{model_flag} {model}: not a folder — pass the {modality} model the run's features came from "
            f"({recorded_model(source)})"
        )
    elif "model_digest" in source and model_digest(model) != source["model_digest"]:
        problems.append(
            f"{model_flag} {model}: config and tokenizer differ from those of {recorded_model(source)}, the "
            f"run's {modality} model (digest {model_digest(model)}, not {source['model_digest']}) — pass "
            f"that model, {fix}"
        )
    elif "model_digest" not in source and model.resolve() != Path(recorded_model(source)).resolve():
        problems.append(
            f"{model_flag} {model}: the run records only the path of its {modality} model "
            f"({recorded_model(source)}) — pass that folder, {fix}"
        )
    return adapter, model, problems


def extract_args(modality: str, entry: dict, adapter: Path, model: Path) -> list[str]:
    """`encoders_torch.extract` arguments that encode ``modality`` with the record's settings."""
    encoder = entry["source"].get("encoder", {})
    args = ["--modality", modality, "--model", str(model), "--adapter", str(adapter), "--dtype", entry["dtype"]]
    names = (
        {"max_length": "--max-length", "template": "--template", "gguf_file": "--gguf-file"}
        if modality == "text"
        else {"max_seconds": "--max-seconds", "prompt": "--prompt"}
    )
    for key, flag in names.items():
        if encoder.get(key) is not None:
            args += [flag, str(encoder[key])]
    return args


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mister_jax.provenance", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="run directory written by python -m mister_jax.train")
    for m in MODALITIES:
        parser.add_argument(f"--{m}-adapter", type=Path, help=f"trained {m} folder (default: the run's record)")
        parser.add_argument(f"--{m}-model", type=Path, help=f"{m} model folder (default: the run's record)")
    parser.add_argument("--allow-mismatch", action="store_true", help="warn about mismatches instead of refusing")
    parser.add_argument("--args-out", required=True, type=Path, help="folder for MODALITY.args")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        record = read(Path(args.run))
        entries = record["modalities"]
        checked = {
            m: check(m, entry, getattr(args, f"{m}_adapter"), getattr(args, f"{m}_model"), record["path"])
            for m, entry in entries.items()
        }
        problems = [p for _, _, ps in checked.values() for p in ps]
        for m in MODALITIES:
            given = [f"--{m}-{k}" for k in ("adapter", "model") if m not in entries and getattr(args, f"{m}_{k}")]
            for flag in given:
                print(f"warning: {flag}: the run uses no {m} features, so it is not used", file=sys.stderr)
        if problems and not args.allow_mismatch:
            raise UsageError("\n".join(problems))
        for line in problems:
            print(f"warning: {line}", file=sys.stderr)
        args.args_out.mkdir(parents=True, exist_ok=True)
        for m, (adapter, model, _) in checked.items():
            text = "\0".join(extract_args(m, entries[m], adapter, model)) + "\0"
            atomic.write_text(args.args_out / f"{m}.args", text, durable=False)
    except UsageError as err:
        for line in str(err).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
