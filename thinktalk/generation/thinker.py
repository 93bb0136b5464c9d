"""The Thinker stage: explicit state, ``prefill`` then one ``step`` per token; sampling is separate.

:class:`ThinkerState` owns everything a running answer needs — the KV cache (per-row fill levels),
the TMRoPE position of the last token read, the rows still running — and the stage functions read
and advance it. A step takes the tokens to read (chosen by a :class:`~thinktalk.generation.sampling.
TokenChooser`, or given: teacher forcing) and returns a :class:`ThinkerRead`: the logits of the next
token and the hidden states of the chosen layers for what was just read (the Talker is conditioned
on them). The stage is the same for both families: it only uses ``Thinker.embed`` / ``Thinker.decode``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from thinktalk.generation.inputs import ModelInputs
from thinktalk.nn.cache import KVCache


@dataclass
class ThinkerState:
    inputs: ModelInputs  # the prompt, on the model's device
    cache: KVCache
    position: torch.Tensor | None = None  # [3, B, 1] TMRoPE position of the last token read
    active: torch.Tensor | None = None  # [B] bool: the row is still generating (the exec mask)
    steps: int = 0  # answer tokens read so far


@dataclass
class ThinkerRead:
    """What the Thinker produced after reading the prompt (``index`` -1) or answer token ``index``."""

    index: int
    logits: torch.Tensor  # [B, V] for the next token
    states: dict[int, torch.Tensor]  # layer -> hidden states of what was read ([B, T, H] prompt, [B, 1, H] token)


class ThinkerStage:
    """Prefill and decode steps of a Thinker (either family); ``keep_layers`` are reported in every read."""

    def __init__(self, thinker, keep_layers: tuple[int, ...] = ()):
        self.thinker = thinker
        self.keep_layers = tuple(keep_layers)

    @property
    def device(self) -> torch.device:
        return self.thinker.lm_head.weight.device

    def new_state(self, inputs: ModelInputs, max_new_tokens: int) -> ThinkerState:
        inputs = inputs.to(self.device)
        cache = self.thinker.model.new_cache(inputs.batch, inputs.length + max_new_tokens)
        return ThinkerState(inputs=inputs, cache=cache)

    def _read(self, index: int, logits: torch.Tensor, out) -> ThinkerRead:
        states = {layer: out.hidden_states[layer] for layer in self.keep_layers} if self.keep_layers else {}
        return ThinkerRead(index=index, logits=logits[:, -1], states=states)

    def prefill(self, state: ThinkerState) -> ThinkerRead:
        """Encode the media, read the whole prompt; returns the logits of answer token 0."""
        th, inputs = self.thinker, state.inputs
        mask = inputs.mask()
        emb = th.embed(inputs.input_ids, mask, use_audio_in_video=inputs.use_audio_in_video, **inputs.media())
        logits, out = th.decode(
            emb.inputs_embeds, emb.position_ids, mask, state.cache, bool(self.keep_layers), logits_to_keep=1,
            **getattr(emb, "decoder_kwargs", {}),
        )
        state.position = emb.position_ids[:, :, -1:].to(self.device)
        state.active = torch.ones(inputs.batch, dtype=torch.bool, device=self.device)
        return self._read(-1, logits, out)

    def step(self, state: ThinkerState, tokens: torch.Tensor) -> ThinkerRead:
        """Read answer token ``state.steps`` (``tokens`` [B]); returns the logits of the one after it."""
        th = self.thinker
        state.position = state.position + 1
        embeds = th.model.embed_tokens(tokens[:, None].to(self.device))
        logits, out = th.decode(embeds, state.position, None, state.cache, bool(self.keep_layers), logits_to_keep=1)
        index = state.steps
        state.steps += 1
        return self._read(index, logits, out)
