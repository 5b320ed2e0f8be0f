"""``--set key=value`` overrides of a `mister_jax.config.Config`, converted to each field's type."""

from __future__ import annotations

import dataclasses
import typing

from mister_jax.config import Config, LossConfig, ModelConfig, TrainConfig


class OverrideError(ValueError):
    """A ``--set`` override that names no field or whose value does not parse."""


_SECTIONS = {"model": ModelConfig, "loss": LossConfig, "train": TrainConfig}


def valid_keys() -> list[str]:
    """Every key ``--set`` accepts (``section.key`` also works)."""
    return [f.name for cls in _SECTIONS.values() for f in dataclasses.fields(cls)]


def _convert(key: str, text: str, kind: typing.Any):
    if kind in (bool, "bool"):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise OverrideError(f"--set {key}={text}: expected true or false")
    try:
        return {"int": int, "float": float, "str": str}.get(kind, kind)(text)
    except (TypeError, ValueError):
        raise OverrideError(f"--set {key}={text}: expected a value of type {getattr(kind, '__name__', kind)}") from None


def apply_overrides(config: Config, overrides: typing.Sequence[str]) -> Config:
    """Applies ``key=value`` (or ``model.key=value`` etc.) strings, converting to each field's type.

    Raises ``OverrideError`` (one line, listing the valid keys for an unknown key) or ``ValueError``
    from the config's own validation.
    """
    changes = {name: {} for name in _SECTIONS}
    for item in overrides:
        if "=" not in item:
            raise OverrideError(f"--set {item}: expected key=value")
        key, text = item.split("=", 1)
        section, _, name = key.rpartition(".")
        sections = [section] if section in _SECTIONS else list(_SECTIONS) if not section else []
        hits = [s for s in sections if name in {f.name for f in dataclasses.fields(_SECTIONS[s])}]
        if not hits:
            raise OverrideError(f"--set {key}: unknown key; valid keys: {', '.join(valid_keys())}")
        for s in hits:
            field = next(f for f in dataclasses.fields(_SECTIONS[s]) if f.name == name)
            changes[s][name] = _convert(key, text.strip(), field.type)
    return Config(*(dataclasses.replace(getattr(config, s), **changes[s]) for s in _SECTIONS))
