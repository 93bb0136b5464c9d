"""What a recipe is: a loss over a batch, which parameters train, and how its data rows are encoded.

The trainer calls, in order:

* ``setup()`` once the model is loaded (load a teacher, inject adapters ...);
* ``select_parameters()`` -> the parameters that train (everything else is frozen and never saved
  in the resumable checkpoints);
* ``encode(row)`` for every data row before training starts, then ``on_dataset(dataset)``;
* per micro-batch: ``prepare(batch, step)`` without gradients (rollouts, teacher scores), ``count(batch)``
  (the units the loss is a sum over: target tokens, sequences ...), then ``loss(modules, batch)`` inside
  the training forward. The trainer divides the summed loss by the count over the whole global batch,
  so the result does not depend on how the batch is split over micro-batches and processes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from thinktalk.train import forward, parts
from thinktalk.train.config import NoOptions, TrainConfig
from thinktalk.train.data import Batch, Example, Row, encode_chat, encode_prompt


@dataclass
class LossOutput:
    loss: torch.Tensor  # summed over the micro-batch's units (see Recipe.count)
    # name -> (sum, weight): logged as Σ sum / Σ weight over the step's micro-batches and processes,
    # or as the total Σ sum when every weight is 0 (counts such as "tokens")
    metrics: dict[str, tuple[float, float]] = field(default_factory=dict)


@dataclass
class StepInfo:
    step: int  # the optimizer step being computed (1-based)
    micro: int  # micro-batch index within the step on this process
    repeat: int = 0  # for recipes that reuse a global batch (GSPO updates per rollout): 0 = its first use


@dataclass
class RecipeContext:
    cfg: TrainConfig
    options: Any
    model: nn.Module  # the loaded Omni model (thinktalk.load)
    processor: Any  # thinktalk.Processor of the checkpoint
    device: torch.device
    rank: int = 0
    world: int = 1
    generation: Any = None  # context manager factory: full (unsharded) weights for model.generate


class Recipe:
    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    # Model components the recipe trains (and which the trainer wraps, shards and saves).
    components: ClassVar[tuple[str, ...]] = ("thinker",)
    # Components thinktalk.load must build (others are copied into the final checkpoint untouched).
    load_components: ClassVar[tuple[str, ...]] = ("thinker",)
    default_trainable: ClassVar[tuple[str, ...]] = ("thinker",)
    # TrainConfig keys this recipe sets when the config does not (stage3: packing, checkpointing ...).
    defaults: ClassVar[dict[str, Any]] = {}
    repeat_batches: int = 1  # optimizer steps per global batch of rows

    def __init__(self, ctx: RecipeContext):
        self.ctx = ctx
        self.cfg = ctx.cfg
        self.options = ctx.options
        self.model = ctx.model
        self.processor = ctx.processor
        self.family = ctx.model.family
        self.positions = forward.positions_fn(ctx.model.thinker, self.family)

    # -- set-up ---------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Called once after the model is loaded (before parameters are selected)."""

    def select_parameters(self) -> dict[str, nn.Parameter]:
        """Freeze everything but the trained parts; return the trained parameters by full name."""
        for p in self.model.parameters():
            p.requires_grad_(False)
        chosen = parts.select(self.model.thinker, self.family, self.cfg.trainable or list(self.default_trainable))
        return {f"thinker.{n}": p for n, p in chosen.items()}

    # -- data -----------------------------------------------------------------------------------------
    def encode(self, row: Row) -> Example:
        raise NotImplementedError

    def on_dataset(self, dataset) -> None:
        """Called once every row is encoded (e.g. to attach stored teacher outputs)."""

    def prepare(self, batch: Batch, step: StepInfo) -> Batch:
        return batch

    def count(self, batch: Batch) -> float:
        return float(batch.num_targets)

    # -- the loss -------------------------------------------------------------------------------------
    def loss(self, modules: nn.Module, batch: Batch) -> LossOutput:
        raise NotImplementedError

    # -- state ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        del state

    def final_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The trained components' tensors (module names) as they go into the final checkpoint."""
        return state

    def write_extras(self, output_dir: str, state: dict[str, torch.Tensor]) -> None:
        """Anything a recipe writes beside the final checkpoint (adapters ...)."""

    def after_export(self, output_dir: str) -> None:
        """Called once the final checkpoint is written (e.g. to add a voice to its config or speakers)."""


@dataclass
class ChatOptions:
    loss_on: str = "assistant"  # "assistant": the assistant turns only; "all": every token of the row


class ChatRecipe(Recipe):
    """Next-token cross-entropy on conversations (pretraining stages, SFT, LoRA)."""

    Options = ChatOptions

    def encode(self, row: Row) -> Example:
        return encode_chat(
            self.processor, row, self.positions, self.cfg.max_length, self.options.loss_on, self.cfg.use_audio_in_video
        )

    def loss(self, modules: nn.Module, batch: Batch) -> LossOutput:
        thinker = modules.thinker
        hidden = forward.hidden_states(thinker, batch, self.cfg.use_audio_in_video)
        h, y, _ = forward.targets(hidden, batch.labels)
        loss = forward.cross_entropy_sum(thinker.lm_head, h, y, self.cfg.loss_chunk_size)
        return LossOutput(loss, {"tokens": (float(y.numel()), 0.0)})


def encode_prompt_row(recipe: Recipe, row: Row) -> Example:
    return encode_prompt(recipe.processor, row, recipe.positions, recipe.cfg.max_length, recipe.cfg.use_audio_in_video)
