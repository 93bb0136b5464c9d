"""The family registry: the one place that knows which ``model_type`` is which model.

Config reading, loading, the processor, the CLI and the server all look a family up here. Modules
are named as strings and imported on first use, so reading a config never imports a model and the
registry imports nothing of the families it lists.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass

from thinktalk.config import ConfigError, read_config


@dataclass(frozen=True)
class Family:
    model_type: str  # config.json's model_type
    name: str  # for people
    config: str  # "module:Class" of the typed config (``Class.from_hf(dict)``)
    model: str  # "module:Class" of the model (``Class(cfg, components=...)``)
    components: tuple[str, ...]  # the components a full checkpoint of the family holds

    def config_class(self):
        return _resolve(self.config)

    def model_class(self):
        return _resolve(self.model)


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family(
            "qwen2_5_omni",
            "Qwen2.5-Omni",
            "thinktalk.models.qwen2_5_omni.config:Qwen25OmniConfig",
            "thinktalk.models.qwen2_5_omni.model:Qwen25Omni",
            ("thinker", "talker", "token2wav"),
        ),
        Family(
            "qwen3_omni_moe",
            "Qwen3-Omni",
            "thinktalk.models.qwen3_omni.config:Qwen3OmniConfig",
            "thinktalk.models.qwen3_omni.model:Qwen3Omni",
            ("thinker", "talker", "code2wav"),
        ),
    )
}
ALL_COMPONENTS = ("thinker", "talker", "token2wav", "code2wav")


def _resolve(path: str):
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def family(model_type: str | None) -> Family:
    if model_type not in FAMILIES:
        known = ", ".join(sorted(FAMILIES))
        raise ConfigError(f"unsupported model_type '{model_type}' in config.json (thinktalk supports: {known})")
    return FAMILIES[model_type]


def family_of(data: dict) -> Family:
    """The family of a ``config.json`` dict."""
    return family(data.get("model_type"))


def load_config(path: str | os.PathLike):
    """The typed config of the checkpoint at ``path`` (family from ``model_type``)."""
    data = read_config(path)
    return family_of(data).config_class().from_hf(data)
