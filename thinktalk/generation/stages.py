"""The stage protocol: what a family supplies so that one driver can run its speech.

A family does not write a pipeline; it supplies two stages, each a ``State`` plus functions over it
(the Thinker stage, :mod:`thinktalk.generation.thinker`, is shared by both families):

- a :class:`TalkerStage`: ``new_state`` → ``prefill`` → (``step_input`` → ``forward``) …, each returning
  codec logits; ``choose`` samples them (Qwen3-Omni: codebook 0, then the code predictor fills in the
  frame). ``forward`` is batched: the engine runs one step for the rows of many requests at once.
  Talker input ``j`` is :meth:`ReplyTrack.entries(j) <thinktalk.generation.reply.ReplyTrack.entries>`;
- a :class:`VocoderStage`: ``new_state`` → ``push`` per Talker step, returning the audio that became
  final for each row (streamed: as soon as it can; offline: once per utterance, at its end).

The engine (:mod:`thinktalk.generation.engine`) decides when each runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from thinktalk.generation.inputs import ModelInputs
from thinktalk.generation.reply import Entry, ReplyTrack
from thinktalk.generation.sampling import TokenChooser
from thinktalk.nn.cache import KVCache


@dataclass
class TalkerState:
    """Everything a running Talker owns (either family)."""

    cache: KVCache | None  # allocated by prefill when the prompt length is only known then
    chooser: TokenChooser  # codebook 0 (Qwen2.5: the only one)
    speaking: torch.Tensor  # [B] bool: rows with a non-empty answer (the others are silent)
    position: torch.Tensor | None = None  # [3, B, 1] TMRoPE position of the last input
    codec_embed: torch.Tensor | None = None  # [B, 1, D] the codec track of the next input (last frame's embedding)
    hidden: torch.Tensor | None = None  # [B, 1, D] last normed hidden state (Qwen3: the code predictor reads it)
    predictor_cache: KVCache | None = None  # Qwen3: the code predictor's per-frame cache
    ended: torch.Tensor | None = None  # [B] bool: the row's utterance has ended (the last frame is not audio)
    frames: list[torch.Tensor] = field(default_factory=list)  # [B, G] per step

    @property
    def steps(self) -> int:
        return len(self.frames)

    @property
    def done(self) -> bool:
        return self.chooser.done

    def codes(self, row: int, end_ids: tuple[int, ...]) -> torch.Tensor:
        """Row ``row``'s frames before its first end token: [n, G]."""
        if not self.frames:
            return torch.zeros(0, 1, dtype=torch.long)
        seq = torch.stack([f[row] for f in self.frames]).cpu()  # [steps, G]
        ends = [i for i, c in enumerate(seq[:, 0].tolist()) if c in end_ids]
        return seq[: ends[0] if ends else len(seq)]


class TalkerStage(Protocol):
    keep_layers: tuple[int, ...]  # the Thinker layers whose states it reads
    end_ids: tuple[int, ...]  # codebook-0 ids that end an utterance

    def cache_length(self, inputs: ModelInputs) -> int:
        """KV slots one row of this request needs (prompt and every step)."""

    def new_cache(self, batch: int, max_len: int) -> KVCache: ...

    def new_state(self, reply: ReplyTrack, inputs: ModelInputs, generator: torch.Generator | None, cache: KVCache
                  ) -> TalkerState: ...  # fmt: skip

    def prefill(self, state: TalkerState, reply: ReplyTrack, inputs: ModelInputs, entries: list[Entry]) -> torch.Tensor:
        """Read the Talker prompt (which ends with input 0) into ``state.cache``; → codebook-0 logits [B, V]."""

    def step_input(self, state: TalkerState, reply: ReplyTrack, entries: list[Entry]) -> tuple[torch.Tensor, torch.Tensor]:
        """Input ``state.steps`` of every row (the last frame + ``entries``) and its position; advances the position."""

    def forward(self, cache: KVCache, embeds: torch.Tensor, positions: torch.Tensor, active=None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
        """One decode step over any rows of a Talker cache (many requests at once) → (logits [B, V], hidden or None)."""

    def choose(self, state: TalkerState, logits: torch.Tensor, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Sample the next frame of every row, [B, G]; records it (and ``state.ended``) in ``state``."""


class VocoderStage(Protocol):
    sample_rate: int

    def new_state(self, batch: int) -> object: ...

    def push(self, state: object, codes: torch.Tensor, ended: torch.Tensor, final: bool, speaking: torch.Tensor
             ) -> list[torch.Tensor | None]:  # fmt: skip
        """Codes [B, G] of one Talker step; ``ended`` [B]: the row's utterance has ended (this code is an end
        token or after one); ``final``: no more steps come. → per row, the audio that became final (or None)."""
