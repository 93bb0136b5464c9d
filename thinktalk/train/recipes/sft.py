"""Thinker supervised fine-tuning: full (``sft``) or with LoRA adapters (``lora``).

Both leave the Talker alone: only Thinker parameters train, and the final checkpoint carries the
Talker and vocoder tensors of the base checkpoint bit for bit, so the model still speaks. ``sft``
trains the LLM by default (``trainable: [thinker]`` also trains the encoders); ``lora`` trains
low-rank adapters on the LLM's attention and dense MLP projections (peft), merges them into the
weights of the final checkpoint and also writes them apart (``output_dir/adapter``;
``thinktalk export`` merges such an adapter into any copy of the base checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from thinktalk.train import lora
from thinktalk.train.recipes.base import ChatOptions, ChatRecipe


class SFT(ChatRecipe):
    name = "sft"
    default_trainable = ("llm",)


@dataclass
class LoRAOptions(ChatOptions):
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    # projection names inside the LLM's decoder layers (Qwen3-Omni's routed experts are stacked
    # tensors, not Linear layers: its adapters go on attention and the dense layers' MLPs)
    lora_targets: list[str] = field(default_factory=lambda: list(lora.DEFAULT_TARGETS))


class LoRA(ChatRecipe):
    name = "lora"
    Options = LoRAOptions

    def setup(self) -> None:
        o = self.options
        self.lora_config = lora.inject(self.model, o.lora_rank, o.lora_alpha, o.lora_dropout, o.lora_targets)

    def select_parameters(self):
        if self.cfg.trainable:
            raise ValueError("lora trains its adapters only: 'trainable' does not apply (use recipe sft to train parts)")
        for name, p in self.model.named_parameters():
            p.requires_grad_(lora.is_adapter(name))
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def final_state(self, state):
        return lora.merge_state(state, self.lora_config)

    def write_extras(self, output_dir: str, state) -> None:
        import os

        lora.save_adapter(os.path.join(output_dir, "adapter"), state, self.lora_config, self.cfg.model)
