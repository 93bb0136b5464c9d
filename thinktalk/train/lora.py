"""LoRA on the Thinker's LLM with peft, and merging adapters back into plain checkpoint tensors.

peft injects its ``lora.Linear`` layers into our own modules (``inject_adapter_in_model``); the
trained model's state then holds ``<proj>.base_layer.weight`` and ``<proj>.lora_A/B.default.weight``.
:func:`merge_state` folds them into ``<proj>.weight`` (W + scale · B A, as peft's ``merge`` does), so
the final checkpoint has the official names and no adapter. An adapter directory (peft's
``adapter_config.json`` + ``adapter_model.safetensors`` with ``<module>.lora_A.weight`` names) is
written beside it; :func:`export` merges one into a base checkpoint (``thinktalk export``).
"""

from __future__ import annotations

import math
import os
import re

import torch

from thinktalk.checkpoint import Checkpoint, CheckpointError, save_tensors

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_FILE = "adapter_model.safetensors"
_ATTENTION = {"q_proj", "k_proj", "v_proj", "o_proj"}
_MLP = {"gate_proj", "up_proj", "down_proj"}


def target_regex(targets: list[str] | tuple[str, ...]) -> str:
    """peft ``target_modules`` regex (full match on names under ``thinker.``): the LLM's decoder layers only,
    never the encoders' or the Talker's projections of the same names."""
    unknown = sorted(set(targets) - _ATTENTION - _MLP)
    if unknown:
        raise ValueError(f"lora_targets: unknown projection(s) {', '.join(unknown)} (known: {', '.join(DEFAULT_TARGETS)})")
    alternatives = [f"self_attn\\.{t}" for t in targets if t in _ATTENTION] + [f"mlp\\.{t}" for t in targets if t in _MLP]
    return r"model\.layers\.\d+\.(" + "|".join(alternatives) + ")"


def inject(model, rank: int, alpha: float, dropout: float, targets):
    """Add LoRA adapters to ``model.thinker`` in place; returns the peft ``LoraConfig``."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_regex(list(targets)))
    inject_adapter_in_model(config, model.thinker)
    return config


def is_adapter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def scaling(config) -> float:
    return config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r)


def merge_state(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """Tensors of a model with injected adapters -> plain tensors (adapters folded into the weights)."""
    scale = scaling(config)
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if is_adapter(name):
            continue
        out[name.replace(".base_layer.", ".")] = t
    for name, a in state.items():
        m = re.match(r"^(.*)\.lora_A\.([^.]+)\.weight$", name)
        if not m:
            continue
        prefix, adapter = m.group(1), m.group(2)
        b = state[f"{prefix}.lora_B.{adapter}.weight"]
        key = f"{prefix}.weight"
        w = out[key]
        out[key] = (w.float() + scale * (b.float() @ a.float())).to(w.dtype)
    return out


def adapter_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter weights of a model's state, under peft's saved names (adapter name dropped)."""
    return {re.sub(r"\.(lora_[AB])\.[^.]+\.weight$", r".\1.weight", k): v for k, v in state.items() if is_adapter(k)}


def save_adapter(directory: str, state: dict[str, torch.Tensor], config, base_model: str) -> None:
    """``adapter_config.json`` + ``adapter_model.safetensors`` (names ``thinker.<module>.lora_A.weight``)."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    config.base_model_name_or_path = base_model
    config.save_pretrained(directory)
    tensors = {k: v.detach().contiguous().cpu() for k, v in adapter_tensors(state).items()}
    save_file(tensors, os.path.join(directory, ADAPTER_FILE), metadata={"format": "pt"})


def load_adapter(directory: str):
    """(LoraConfig, adapter tensors) of an adapter directory."""
    from peft import LoraConfig
    from safetensors.torch import load_file

    if not os.path.exists(os.path.join(directory, "adapter_config.json")):
        raise FileNotFoundError(f"'{directory}' has no adapter_config.json (is it a LoRA adapter directory?)")
    config = LoraConfig.from_pretrained(directory)
    path = os.path.join(directory, ADAPTER_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"'{directory}' has no {ADAPTER_FILE}")
    return config, load_file(path)


def export(adapter_dir: str, output_dir: str, base: str | None = None) -> str:
    """Merge the adapter at ``adapter_dir`` into its base checkpoint; write a plain checkpoint to ``output_dir``."""
    from thinktalk.config import read_config
    from thinktalk.families import family_of
    from thinktalk.loading import resolve_path
    from thinktalk.train.checkpointing import copy_extras

    config, adapter = load_adapter(adapter_dir)
    base = base or config.base_model_name_or_path
    if not base:
        raise ValueError("the adapter does not name its base checkpoint: pass --base DIR")
    base_dir = resolve_path(base)
    if os.path.abspath(base_dir) == os.path.abspath(output_dir):
        raise ValueError("the output directory is the base checkpoint itself: choose another one")
    family_of(read_config(base_dir))
    ckpt = Checkpoint.open(base_dir)
    tensors = {name: ckpt.tensor(name) for name in ckpt.names()}
    scale = scaling(config)
    for name, a in adapter.items():
        if not name.endswith(".lora_A.weight"):
            continue
        prefix = name[: -len(".lora_A.weight")]
        key = f"{prefix}.weight"
        if key not in tensors:
            raise CheckpointError(f"the adapter has '{name}' but the base checkpoint has no '{key}'")
        b = adapter.get(f"{prefix}.lora_B.weight")
        if b is None:
            raise CheckpointError(f"the adapter has '{name}' but no '{prefix}.lora_B.weight'")
        w = tensors[key]
        tensors[key] = (w.float() + scale * (b.float() @ a.float())).to(w.dtype)
    save_tensors(tensors, output_dir)
    copy_extras(base_dir, output_dir)
    return output_dir
