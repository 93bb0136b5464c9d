"""Named parts of the Thinker, so a recipe (or a config's ``trainable`` key) says what trains in words.

Parts, by parameter-name prefix under ``thinker.``:

=================  =====================================================  ======================================
part               Qwen2.5-Omni                                           Qwen3-Omni
=================  =====================================================  ======================================
``embed_tokens``   ``model.embed_tokens``                                 same
``llm_layers``     ``model.layers``, ``model.norm``                       same
``lm_head``        ``lm_head``                                            same
``audio_encoder``  ``audio_tower`` except its adapter                     same
``audio_adapter``  ``audio_tower.proj`` (to the LLM width)                ``audio_tower.proj1``, ``audio_tower.proj2``
``vision_encoder`` ``visual`` except its adapter                          same
``vision_adapter`` ``visual.merger`` (2x2 patch merger)                   ``visual.merger``, ``visual.merger_list``
=================  =====================================================  ======================================

Groups: ``llm`` = embed_tokens + llm_layers + lm_head; ``adapters`` = audio_adapter + vision_adapter;
``encoders`` = audio_encoder + vision_encoder; ``thinker`` = everything above.
"""

from __future__ import annotations

from torch import nn

ADAPTER_PREFIXES = {
    "qwen2_5_omni": {"audio_adapter": ("audio_tower.proj.",), "vision_adapter": ("visual.merger.",)},
    "qwen3_omni_moe": {
        "audio_adapter": ("audio_tower.proj1.", "audio_tower.proj2."),
        "vision_adapter": ("visual.merger.", "visual.merger_list."),
    },
}

GROUPS = {
    "llm": ("embed_tokens", "llm_layers", "lm_head"),
    "adapters": ("audio_adapter", "vision_adapter"),
    "encoders": ("audio_encoder", "vision_encoder"),
    "thinker": ("embed_tokens", "llm_layers", "lm_head", "audio_encoder", "audio_adapter", "vision_encoder", "vision_adapter"),
}
PARTS = GROUPS["thinker"]


def part_of(name: str, family: str) -> str | None:
    """The part of Thinker parameter ``name`` (relative to ``thinker.``), or None for a name outside them."""
    adapters = ADAPTER_PREFIXES[family]
    for part, prefixes in adapters.items():
        if name.startswith(prefixes):
            return part
    if name.startswith("model.embed_tokens."):
        return "embed_tokens"
    if name.startswith(("model.layers.", "model.norm.")):
        return "llm_layers"
    if name.startswith("lm_head."):
        return "lm_head"
    if name.startswith("audio_tower."):
        return "audio_encoder"
    if name.startswith("visual."):
        return "vision_encoder"
    return None


def expand(names: list[str] | tuple[str, ...]) -> set[str]:
    """Part and group names -> part names; an unknown name is an error listing the known ones."""
    out: set[str] = set()
    for n in names:
        if n in GROUPS:
            out.update(GROUPS[n])
        elif n in PARTS:
            out.add(n)
        else:
            known = ", ".join(list(PARTS) + list(GROUPS))
            raise ValueError(f"trainable: unknown part '{n}' (known: {known})")
    return out


def select(thinker: nn.Module, family: str, parts: list[str] | tuple[str, ...]) -> dict[str, nn.Parameter]:
    """Set ``requires_grad`` on the Thinker's parameters of ``parts`` (off elsewhere); return them by name."""
    wanted = expand(parts)
    chosen = {}
    for name, p in thinker.named_parameters():
        train = part_of(name, family) in wanted
        p.requires_grad_(train)
        if train:
            chosen[name] = p
    return chosen
