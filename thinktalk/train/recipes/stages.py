"""The three pretraining stages of the Qwen-Omni papers, as configurations of one next-token loss.

* **stage1** — encoder alignment: the LLM is frozen; the audio and vision encoders and their adapters
  (the projections into the LLM's width) train on audio-text and image-text conversations. Qwen3-Omni
  does not co-train the encoders with the frozen LLM (the paper: they would learn to make up for
  the LLM's limits): ``adapters_only: true`` trains the adapters alone.
* **stage2** — every Thinker parameter trains, on mixed multimodal data (a weighted ``data`` list).
* **stage3** — long sequences (32k tokens and beyond): rows are packed into ``max_length`` sequences,
  each keeping its own attention block and TMRoPE positions; gradient checkpointing and the chunked
  LM-head loss keep memory bounded.
"""

from __future__ import annotations

from dataclasses import dataclass

from thinktalk.train import parts
from thinktalk.train.recipes.base import ChatOptions, ChatRecipe


@dataclass
class Stage1Options(ChatOptions):
    adapters_only: bool = False  # Qwen3-Omni's stage 1: only the projection/merger layers train


class Stage1(ChatRecipe):
    name = "stage1"
    Options = Stage1Options
    default_trainable = ("encoders", "adapters")

    def select_parameters(self):
        if self.options.adapters_only and not self.cfg.trainable:
            for p in self.model.parameters():
                p.requires_grad_(False)
            chosen = parts.select(self.model.thinker, self.family, ["adapters"])
            return {f"thinker.{n}": p for n, p in chosen.items()}
        trained = super().select_parameters()
        llm = parts.expand(["llm"])
        leaked = [n for n in trained if parts.part_of(n[len("thinker."):], self.family) in llm]
        if leaked:
            raise ValueError(f"stage1 keeps the LLM frozen, but trainable selects {leaked[0]} ... ({len(leaked)} tensors)")
        return trained


class Stage2(ChatRecipe):
    name = "stage2"
    default_trainable = ("thinker",)


class Stage3(ChatRecipe):
    name = "stage3"
    default_trainable = ("thinker",)
    defaults = {"packing": True, "gradient_checkpointing": True, "loss_chunk_size": 4096, "max_length": 32768}
