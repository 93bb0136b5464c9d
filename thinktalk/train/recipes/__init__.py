"""Training recipes: each is a small module (a loss over a batch, which parameters train, its data rows)
over the one trainer in :mod:`thinktalk.train.trainer`."""

from __future__ import annotations

import importlib

from thinktalk.train.config import TrainConfigError

RECIPES: dict[str, str] = {
    "stage1": "thinktalk.train.recipes.stages:Stage1",
    "stage2": "thinktalk.train.recipes.stages:Stage2",
    "stage3": "thinktalk.train.recipes.stages:Stage3",
    "sft": "thinktalk.train.recipes.sft:SFT",
    "lora": "thinktalk.train.recipes.sft:LoRA",
    "distill": "thinktalk.train.recipes.distill:Distill",
    "gspo": "thinktalk.train.recipes.gspo:GSPO",
    "talker": "thinktalk.train.recipes.talker:TalkerTraining",
    "dpo": "thinktalk.train.recipes.talker:TalkerDPO",
    "speaker": "thinktalk.train.recipes.talker:SpeakerTraining",
}
# Named by the training issue but not run by this trainer ("codec" runs thinktalk.codec's own loop).
PLANNED: tuple[str, ...] = ()


def recipe_class(name: str):
    """The Recipe class registered under ``name``."""
    if name not in RECIPES:
        if name in PLANNED:
            raise TrainConfigError(f"recipe '{name}' is not available in this version of thinktalk yet")
        raise TrainConfigError(f"unknown recipe '{name}' (available: {', '.join(RECIPES)})")
    module, _, attr = RECIPES[name].partition(":")
    return getattr(importlib.import_module(module), attr)


__all__ = ["RECIPES", "recipe_class"]
