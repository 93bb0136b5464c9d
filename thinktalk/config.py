"""Configuration: typed dataclasses built from a checkpoint's ``config.json``.

Each model family keeps its dataclasses next to its modules (``models/<family>/config.py``);
this module holds what they share: reading ``config.json``, the generic ``from_hf`` builder
with clear errors, and rotary settings in both the old (``rope_theta`` + ``rope_scaling``) and the
new (``rope_parameters``) spelling. Which ``model_type`` is which family: :mod:`thinktalk.families`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from typing import Any, TypeVar


class ConfigError(ValueError):
    """A ``config.json`` that thinktalk cannot build a model from."""


T = TypeVar("T")


# Ranges of the structural fields, by the checkpoint's field names (whatever component declares them).
# Wide enough for every released checkpoint (the largest official values are in the comments) and any
# plausible successor; narrow enough that a typo fails at once instead of building 100000 layers.
LAYER_LIMIT = 1024  # official: 48 (Qwen3-Omni Thinker)
WIDTH_LIMIT = 2**17  # official: 18944 (Qwen2.5-Omni-7B intermediate_size)
HEAD_LIMIT = 1024  # official: 32
FIELD_RANGES: dict[str, tuple[float, float]] = {
    **dict.fromkeys(("num_hidden_layers", "encoder_layers", "depth"), (1, LAYER_LIMIT)),
    **dict.fromkeys(("num_attention_heads", "num_key_value_heads", "encoder_attention_heads", "num_heads"),
                    (1, HEAD_LIMIT)),  # fmt: skip
    **dict.fromkeys(
        ("hidden_size", "intermediate_size", "d_model", "encoder_ffn_dim", "output_dim", "out_hidden_size",
         "embedding_size", "moe_intermediate_size", "downsample_hidden_size", "thinker_hidden_size", "decoder_dim",
         "upsample_initial_channel", "emb_dim", "enc_emb_dim", "enc_dim", "enc_attention_channels", "enc_se_channels",
         "mel_dim", "num_mel_bins", "in_channels"),
        (1, WIDTH_LIMIT),
    ),  # fmt: skip
    "shared_expert_intermediate_size": (0, WIDTH_LIMIT),
    "head_dim": (1, 4096),  # official: 128
    "vocab_size": (1, 2**24),  # official: 152064
    "codebook_size": (1, 2**24),
    "num_embeds": (1, 2**24),
    "num_experts": (0, 4096),  # official: 128
    "num_experts_per_tok": (1, 4096),
    "num_code_groups": (1, 1024),
    "num_quantizers": (1, 1024),
    "max_position_embeddings": (1, 2**24),  # official: 65536
    "max_source_positions": (1, 2**24),
    "num_position_embeddings": (1, 2**24),
    "patch_size": (1, 1024),
    "temporal_patch_size": (1, 64),
    "spatial_merge_size": (1, 64),
    "window_size": (1, 2**20),
    "n_window": (1, 2**20),
    "n_window_infer": (1, 2**20),
    "conv_chunksize": (1, 2**20),
    "sliding_window": (1, 2**24),
    "block_size": (1, 2**20),
    "repeats": (1, 64),
    "ff_mult": (1, 64),
    "enc_res2net_scale": (1, 64),
    "decoder_sparse_step": (1, LAYER_LIMIT),
    "sample_rate": (1, 10**6),
    "rms_norm_eps": (0, 1),
    "rope_theta": (0, 1e15),
}
INT_LIMIT = 2**31 - 1  # any other integer field (token ids, offsets): non-negative and representable


def _type_name(value: Any) -> str:
    return "null" if value is None else {bool: "boolean", int: "integer", float: "number", str: "string",
                                         list: "list", dict: "object"}.get(type(value), type(value).__name__)  # fmt: skip


def check_value(value: Any, annotation: Any, name: str) -> Any:
    """``value`` of config field ``name`` checked against its annotation and range; JSON lists become tuples.

    Raises ``ConfigError`` naming the field, the expected type or range and what was found.
    """
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None:
            return None
        return check_value(value, args[0], name) if args else value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config field '{name}' must be a list, got {_type_name(value)} {value!r}")
        args = typing.get_args(annotation)
        inner = args[0] if args else Any
        return tuple(check_value(v, inner, f"{name}[{i}]") for i, v in enumerate(value))
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config field '{name}' must be true or false, got {_type_name(value)} {value!r}")
        return value
    if annotation is int or annotation is float:
        ok = isinstance(value, int) if annotation is int else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok:
            kind = "an integer" if annotation is int else "a number"
            raise ConfigError(f"config field '{name}' must be {kind}, got {_type_name(value)} {value!r}")
        if annotation is float and not math.isfinite(value):
            raise ConfigError(f"config field '{name}' must be a finite number, got {value!r}")
        leaf = name.rsplit(".", 1)[-1].split("[", 1)[0]
        low, high = FIELD_RANGES.get(leaf, (0, INT_LIMIT) if annotation is int else (-math.inf, math.inf))
        if "[" in name:
            low, high = (0, INT_LIMIT) if annotation is int else (-math.inf, math.inf)
        if not low <= value <= high:
            raise ConfigError(f"config field '{name}' is {value!r}; it must be between {low:g} and {high:g}")
        return float(value) if annotation is float else value
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"config field '{name}' must be a string, got {_type_name(value)} {value!r}")
        return value
    if annotation is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config field '{name}' must be an object, got {_type_name(value)}")
        return value
    return value


def field_value(data: dict, key: str, where: str, annotation: Any = int, default: Any = None) -> Any:
    """``data[key]`` checked like :func:`from_dict` checks declared fields (for values needed before building)."""
    if data.get(key) is None:
        if default is None:
            raise ConfigError(f"config field '{where}.{key}' is missing")
        return default
    return check_value(data[key], annotation, f"{where}.{key}")


def divisible(where: str, hidden_key: str, hidden: int, heads_key: str, heads: int) -> None:
    """``hidden % heads == 0``, or a ConfigError naming both fields."""
    if hidden % heads:
        raise ConfigError(f"{where}: {hidden_key} ({hidden}) must be a multiple of {heads_key} ({heads})")


def from_dict(cls: type[T], data: dict, where: str, **overrides: Any) -> T:
    """Build dataclass ``cls`` from the keys of ``data`` that it declares.

    Keys it does not declare are ignored (HF configs carry many unrelated fields); a declared
    field without a default that is absent raises ``ConfigError`` naming ``where.field``, and so does
    a value of the wrong type or outside :data:`FIELD_RANGES` (checked here, at the boundary, so a bad
    config fails before a single module is built).
    """
    if not isinstance(data, dict):
        raise ConfigError(f"config field '{where}' must be an object, got {_type_name(data)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.name in overrides:
            kwargs[f.name] = overrides[f.name]
        elif f.name in data and data[f.name] is not None:
            kwargs[f.name] = check_value(data[f.name], hints[f.name], f"{where}.{f.name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"config field '{where}.{f.name}' is missing (needed by {cls.__name__})")
    cfg = cls(**kwargs)
    heads = getattr(cfg, "num_attention_heads", None)
    kv = getattr(cfg, "num_key_value_heads", None)
    if isinstance(heads, int) and isinstance(kv, int) and heads % kv:
        raise ConfigError(f"{where}: num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv})")
    return cfg


def sub(data: dict, key: str, where: str) -> dict:
    """The nested config ``data[key]``, or a clear error naming it."""
    value = data.get(key)
    if not isinstance(value, dict):
        raise ConfigError(f"config field '{where}.{key}' is missing or not an object")
    return value


def rope_settings(data: dict, default_theta: float, where: str = "config") -> tuple[float, tuple[int, ...] | None, bool]:
    """(theta, mrope_section, interleaved) from either spelling of the rotary settings.

    Official checkpoints (saved by transformers 4.x) write ``rope_theta`` and
    ``rope_scaling={"type": "mrope"|"default", "mrope_section": [...]}``; transformers 5 writes
    ``rope_parameters={"rope_theta": ..., "mrope_section": [...], "mrope_interleaved": ...}``.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"config field '{where}' must be an object, got {_type_name(data)}")
    params = data.get("rope_parameters") or {}
    scaling = data.get("rope_scaling") or {}
    for key, value in (("rope_parameters", params), ("rope_scaling", scaling)):
        if not isinstance(value, dict):
            raise ConfigError(f"config field '{where}.{key}' must be an object, got {_type_name(value)}")
    spelled = "rope_parameters" if "rope_theta" in params else "rope_theta"
    theta = params.get("rope_theta", data.get("rope_theta", default_theta))
    theta = check_value(theta, float, f"{where}.{spelled}")
    if theta <= 0:
        raise ConfigError(f"config field '{where}.{spelled}' is {theta!r}; it must be positive")
    section = params.get("mrope_section", scaling.get("mrope_section"))
    if section is not None:
        section = check_value(section, tuple[int, ...], f"{where}.mrope_section")
    interleaved = bool(params.get("mrope_interleaved", scaling.get("mrope_interleaved", scaling.get("interleaved", False))))
    rope_type = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if rope_type not in ("default", "mrope", "axial", None):
        raise ConfigError(f"rotary type '{rope_type}' is not supported (only default/mrope/axial)")
    return theta, section, interleaved


def read_config(path: str | os.PathLike) -> dict:
    """Read ``config.json`` from a checkpoint directory (or the file itself)."""
    path = os.fspath(path)
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.exists(file):
        raise ConfigError(f"no config.json in '{path}'")
    try:
        with open(file, encoding="utf-8") as fh:
            data = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ConfigError(f"'{file}' is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"'{file}' must hold a JSON object, not a {_type_name(data)}")
    return data
