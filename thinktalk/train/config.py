"""Training configuration: one YAML file per run, ``key=value`` overrides, typed dataclasses.

A config is flat: the keys every recipe understands (:class:`TrainConfig`) and the keys of the chosen
recipe's options dataclass sit side by side::

    recipe: sft
    model: /models/Qwen2.5-Omni-7B
    data: [{path: data/chat.jsonl, weight: 3}, data/captions.jsonl]
    output_dir: runs/sft
    lr: 1.0e-5
    max_steps: 1000

``thinktalk train sft.yaml lr=2e-5 max_steps=10`` overrides any key; values are converted to the
field's type (``lr=2e-5`` is a float even though YAML 1.1 reads it as a string) and an unknown key is
an error that lists the known ones.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml


class TrainConfigError(ValueError):
    """A training config (file or override) that cannot be used."""


@dataclass
class DataSource:
    """One JSONL file of a mixture; ``weight`` is its share of the sampled rows (relative to the others)."""

    path: str
    weight: float = 1.0


@dataclass
class TrainConfig:
    """The keys every recipe understands."""

    recipe: str
    model: str
    data: list[DataSource]
    output_dir: str
    max_steps: int = 100
    lr: float = 1e-5
    batch_size: int = 1  # rows (or packed rows) per process per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step; global batch = batch_size * grad_accum * processes
    seed: int = 0
    max_length: int = 4096  # a longer row is a bad row (never truncated)
    # optimizer and schedule: AdamW, linear warmup, cosine decay to min_lr_ratio * lr at max_steps
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0  # 0 = no clipping
    # what trains: part names (see thinktalk.train.parts); empty = the recipe's default
    trainable: list[str] = field(default_factory=list)
    # precision and memory
    device: str = "auto"  # auto: cuda:LOCAL_RANK when CUDA is available, else cpu
    dtype: str = "float32"  # master weights
    autocast: str = "auto"  # auto: bfloat16 autocast on CUDA, none on CPU; or "bfloat16" / "none"
    gradient_checkpointing: bool = False
    loss_chunk_size: int = 0  # > 0: the LM head and cross-entropy run on chunks of this many tokens
    # data
    packing: bool = False  # several rows per sequence (up to max_length), attention and TMRoPE kept per row
    length_bucketing: bool = True  # batch rows of similar length together
    bucket_batches: int = 16  # how many global batches are sorted by length together
    skip_bad_rows: bool = False  # skip (and count) rows that cannot be used instead of stopping
    use_audio_in_video: bool = False
    # logging and checkpoints
    log_every: int = 1
    save_every: int = 500  # resumable checkpoint every N steps and at the end (0 = none)
    save_total_limit: int = 0  # keep only the newest N resumable checkpoints (0 = keep all)
    resume: str = "auto"  # auto: continue from the newest output_dir/checkpoint-STEP; never; or a path
    save_final: bool = True  # write the trained model in the official layout into output_dir
    tensorboard: str = "auto"  # auto (when installed) | true | false
    progress: bool = True

    @property
    def data_paths(self) -> list[str]:
        return [d.path for d in self.data]


@dataclass
class NoOptions:
    """A recipe without options of its own."""


def _is_optional(annotation: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1 and type(None) in typing.get_args(annotation):
            return True, args[0]
    return False, annotation


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def coerce(value: Any, annotation: Any, where: str) -> Any:
    """``value`` (from YAML or an override string) converted to ``annotation``, or a clear error."""
    optional, annotation = _is_optional(annotation)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("null", "none", "~")):
        if optional:
            return None
        raise TrainConfigError(f"{where}: a value is required")
    origin = typing.get_origin(annotation)
    try:
        if annotation is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, (int, str)) and str(value).lower() in _TRUE | _FALSE:
                return str(value).lower() in _TRUE
            raise ValueError
        if annotation is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if annotation is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if annotation is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value).lower() if isinstance(value, bool) else str(value)
        if annotation is DataSource:
            if isinstance(value, str):
                return DataSource(path=value)
            if isinstance(value, dict):
                return build(DataSource, value, where)
            raise ValueError
        if dataclasses.is_dataclass(annotation):
            if not isinstance(value, dict):
                raise ValueError
            return build(annotation, value, where)
        if origin in (list, tuple):
            (inner, *_) = typing.get_args(annotation) or (Any,)
            if isinstance(value, str):
                parsed = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
                value = parsed
            if not isinstance(value, (list, tuple)):
                value = [value]
            items = [coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
            return items if origin is list else tuple(items)
        if origin is dict:
            if isinstance(value, str):
                value = yaml.safe_load(value)
            if not isinstance(value, dict):
                raise ValueError
            return dict(value)
        if annotation is Any:
            return value
    except TrainConfigError:
        raise
    except (TypeError, ValueError):
        pass
    else:
        return value
    name = getattr(annotation, "__name__", str(annotation))
    raise TrainConfigError(f"{where}: expected {name}, got {value!r}")


def build(cls: type, data: dict, where: str):
    """Dataclass ``cls`` from ``data``; unknown keys and missing required keys are errors."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise TrainConfigError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = coerce(data[f.name], hints[f.name], f"{where}.{f.name}" if where else f.name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise TrainConfigError(f"{where + ': ' if where else ''}the key '{f.name}' is required")
    return cls(**kwargs)


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` -> (key, value as YAML reads it; the field's type is applied later)."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise TrainConfigError(f"override '{text}' is not key=value")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return key, parsed


@dataclass
class LoadedConfig:
    train: TrainConfig
    options: Any  # the recipe's options dataclass
    raw: dict  # the merged YAML + overrides, as given (written next to the checkpoints)


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None, base: dict | None = None) -> LoadedConfig:
    """Read a YAML config (or start from ``base``), apply ``key=value`` overrides, build the dataclasses."""
    raw: dict = dict(base or {})
    if path is not None:
        path = os.fspath(path)
        if not os.path.exists(path):
            raise TrainConfigError(f"config file '{path}' does not exist")
        try:
            with open(path, encoding="utf-8") as fh:
                loaded = yaml.safe_load(fh) or {}
        except yaml.YAMLError as e:
            raise TrainConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise TrainConfigError(f"{path}: a config is a mapping of keys to values, got {type(loaded).__name__}")
        raw.update(loaded)
    for text in overrides or []:
        key, value = parse_override(text)
        raw[key] = value
    return resolve(raw, where=os.fspath(path) if path is not None else "config")


def resolve(raw: dict, where: str = "config") -> LoadedConfig:
    from thinktalk.train.recipes import recipe_class

    if "recipe" not in raw:
        raise TrainConfigError(f"{where}: the key 'recipe' is required")
    cls = recipe_class(str(raw["recipe"]))
    train_names = {f.name for f in dataclasses.fields(TrainConfig)}
    option_names = {f.name for f in dataclasses.fields(cls.Options)}
    unknown = sorted(set(raw) - train_names - option_names)
    if unknown:
        raise TrainConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)} for recipe '{raw['recipe']}'. Common keys: "
            f"{', '.join(sorted(train_names))}. Keys of this recipe: {', '.join(sorted(option_names)) or '(none)'}"
        )
    given = {k: v for k, v in raw.items() if k in train_names}
    train = build(TrainConfig, {**cls.defaults, **given}, "")
    options = build(cls.Options, {k: v for k, v in raw.items() if k in option_names}, raw["recipe"])
    check(train)
    return LoadedConfig(train=train, options=options, raw=raw)


def check(cfg: TrainConfig) -> None:
    if not cfg.data:
        raise TrainConfigError("data: give at least one JSONL file")
    for name in ("max_steps", "batch_size", "grad_accum", "max_length", "log_every", "bucket_batches"):
        if getattr(cfg, name) < 1:
            raise TrainConfigError(f"{name} must be >= 1 (got {getattr(cfg, name)})")
    if cfg.lr < 0:
        raise TrainConfigError(f"lr must be >= 0 (got {cfg.lr})")
    for d in cfg.data:
        if d.weight <= 0:
            raise TrainConfigError(f"data: the weight of '{d.path}' must be > 0 (got {d.weight})")
    if cfg.dtype not in ("float32", "bfloat16"):
        raise TrainConfigError(f"dtype must be float32 or bfloat16 (got {cfg.dtype!r})")
    if cfg.autocast not in ("auto", "bfloat16", "none"):
        raise TrainConfigError(f"autocast must be auto, bfloat16 or none (got {cfg.autocast!r})")
    if cfg.tensorboard not in ("auto", "true", "false"):
        raise TrainConfigError(f"tensorboard must be auto, true or false (got {cfg.tensorboard!r})")


def to_yaml(raw: dict) -> str:
    return yaml.safe_dump(raw, sort_keys=False)
