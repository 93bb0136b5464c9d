"""Configuration: typed dataclasses built from a checkpoint's ``config.json``.

Each model family keeps its dataclasses next to its modules (``models/<family>/config.py``);
this module holds what they share: reading ``config.json``, the generic ``from_hf`` builder
with clear errors, and rotary settings in both the old (``rope_theta`` + ``rope_scaling``) and the
new (``rope_parameters``) spelling. Which ``model_type`` is which family: :mod:`thinktalk.families`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from typing import Any, TypeVar


class ConfigError(ValueError):
    """A ``config.json`` that thinktalk cannot build a model from."""


T = TypeVar("T")


def _coerce(value: Any, annotation: Any) -> Any:
    """Turn JSON lists into the tuples our frozen dataclasses use (nested for tuple[tuple[int, ...], ...])."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0]) if args else value
    if origin is tuple and isinstance(value, (list, tuple)):
        args = typing.get_args(annotation)
        inner = args[0] if args else Any
        return tuple(_coerce(v, inner) for v in value)
    return value


def from_dict(cls: type[T], data: dict, where: str, **overrides: Any) -> T:
    """Build dataclass ``cls`` from the keys of ``data`` that it declares.

    Keys it does not declare are ignored (HF configs carry many unrelated fields); a declared
    field without a default that is absent raises ``ConfigError`` naming ``where.field``.
    """
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.name in overrides:
            kwargs[f.name] = overrides[f.name]
        elif f.name in data and data[f.name] is not None:
            kwargs[f.name] = _coerce(data[f.name], hints[f.name])
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"config field '{where}.{f.name}' is missing (needed by {cls.__name__})")
    return cls(**kwargs)


def sub(data: dict, key: str, where: str) -> dict:
    """The nested config ``data[key]``, or a clear error naming it."""
    value = data.get(key)
    if not isinstance(value, dict):
        raise ConfigError(f"config field '{where}.{key}' is missing or not an object")
    return value


def rope_settings(data: dict, default_theta: float) -> tuple[float, tuple[int, ...] | None, bool]:
    """(theta, mrope_section, interleaved) from either spelling of the rotary settings.

    Official checkpoints (saved by transformers 4.x) write ``rope_theta`` and
    ``rope_scaling={"type": "mrope"|"default", "mrope_section": [...]}``; transformers 5 writes
    ``rope_parameters={"rope_theta": ..., "mrope_section": [...], "mrope_interleaved": ...}``.
    """
    params = data.get("rope_parameters") or {}
    scaling = data.get("rope_scaling") or {}
    theta = params.get("rope_theta", data.get("rope_theta", default_theta))
    section = params.get("mrope_section", scaling.get("mrope_section"))
    interleaved = bool(params.get("mrope_interleaved", scaling.get("mrope_interleaved", scaling.get("interleaved", False))))
    rope_type = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if rope_type not in ("default", "mrope", "axial", None):
        raise ConfigError(f"rotary type '{rope_type}' is not supported (only default/mrope/axial)")
    return float(theta), (tuple(int(s) for s in section) if section is not None else None), interleaved


def read_config(path: str | os.PathLike) -> dict:
    """Read ``config.json`` from a checkpoint directory (or the file itself)."""
    path = os.fspath(path)
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.exists(file):
        raise ConfigError(f"no config.json in '{path}'")
    try:
        with open(file, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as e:
        raise ConfigError(f"'{file}' is not valid JSON: {e}") from e
