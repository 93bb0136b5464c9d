"""The Thinker stage: explicit state, ``prefill`` (in pieces if asked) then decode steps; sampling is separate.

:class:`ThinkerState` is one request's Thinker: its rows of the engine's KV cache, how much of the
prompt it has read, the TMRoPE position of the last token read and how many answer tokens it has
read. :meth:`ThinkerStage.prefill` reads the prompt (the media encoders run once — :meth:`ThinkerStage.embed`,
which the engine may run on its encoder thread — and the LLM reads it in pieces of at most ``max_tokens``
when asked, so a long prompt does not hold up other requests);
:meth:`ThinkerStage.decode` is one batched step over any rows of a cache — the engine's many requests
at once, with an exec mask for rows that sit this step out. Each returns a :class:`ThinkerRead`: the
logits of the next token and the hidden states of the chosen layers for what was just read (the Talker
is conditioned on them). Tokens are chosen elsewhere (:class:`~thinktalk.generation.sampling.TokenChooser`).
The stage is the same for both families: it only uses ``Thinker.embed`` / ``Thinker.decode``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from thinktalk.generation.inputs import ModelInputs
from thinktalk.nn.cache import KVCache


@dataclass
class ThinkerRead:
    """What the Thinker produced after reading the prompt (``index`` -1) or answer token ``index``."""

    index: int
    logits: torch.Tensor  # [B, V] for the next token
    states: dict[int, torch.Tensor]  # layer -> hidden states of what was read ([B, T, H] prompt, [B, 1, H] token)


@dataclass
class ThinkerState:
    inputs: ModelInputs  # the prompt, on the model's device
    cache: KVCache  # this request's rows
    embedded: object | None = None  # the prompt's embeddings and positions (from embed_start on) while read
    embed_start: int = 0  # where the embeddings start (prefix reuse: the first token not in the cache, or the
    # start of the audio clip it lies in when the cache holds the clip's first windows)
    embed_from: int | None = None  # set by the engine for the latter
    prefilled: int = 0  # prompt tokens read
    position: torch.Tensor | None = None  # [3, B, 1] TMRoPE position of the last token read
    steps: int = 0  # answer tokens read
    prompt_states: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # per keep layer, piece by piece

    @property
    def prefill_done(self) -> bool:
        return self.position is not None


class ThinkerStage:
    """Prefill and decode steps of a Thinker (either family); ``keep_layers`` are reported in every read."""

    def __init__(self, thinker, keep_layers: tuple[int, ...] = ()):
        self.thinker = thinker
        self.keep_layers = tuple(keep_layers)

    @property
    def device(self) -> torch.device:
        return self.thinker.lm_head.weight.device

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        return self.thinker.model.new_cache(batch, max_len)

    def new_state(self, inputs: ModelInputs, cache: KVCache) -> ThinkerState:
        """A request's Thinker on ``cache`` (its rows; emptied first)."""
        if cache.batch != inputs.batch:
            raise ValueError(f"the cache has {cache.batch} rows for {inputs.batch} conversations")
        if inputs.length >= cache.max_len:
            raise ValueError(f"the prompt is {inputs.length} tokens; the cache holds {cache.max_len}")
        cache.reset()
        return ThinkerState(inputs=inputs.to(self.device), cache=cache)

    def _states(self, out) -> dict[int, torch.Tensor]:
        return {layer: out.hidden_states[layer] for layer in self.keep_layers} if self.keep_layers else {}

    @staticmethod
    def embed_start(state: ThinkerState) -> int:
        """Where the prompt's embeddings start: the first token not in the cache, or the start of the audio clip
        it lies in (``embed_from``)."""
        return state.prefilled if state.embed_from is None else state.embed_from

    def embed(self, inputs: ModelInputs, start: int):
        """The prompt's embeddings and positions from ``start`` on: the media encoders' work. It reads only
        ``inputs`` and the weights, so it may run on another thread (the engine's ``encode_async``); hand
        the result to :meth:`prefill` through ``state.embedded`` / ``state.embed_start``."""
        return self.thinker.embed(inputs.input_ids, inputs.mask(), use_audio_in_video=inputs.use_audio_in_video,
                                  start=start, **inputs.media())  # fmt: skip

    def prefill(self, state: ThinkerState, max_tokens: int | None = None) -> ThinkerRead | None:
        """Read the next piece of the prompt (all of it when ``max_tokens`` is None).

        Returns the read of the whole prompt (logits of answer token 0, the prompt's hidden states) once
        its last piece is read, None before that.
        """
        th, inputs = self.thinker, state.inputs
        mask = inputs.mask()
        if state.embedded is None:
            state.embed_start = self.embed_start(state)
            state.embedded = self.embed(inputs, state.embed_start)
        emb, offset = state.embedded, state.embed_start
        start = state.prefilled
        end = inputs.length if max_tokens is None else min(inputs.length, start + max_tokens)
        piece = slice(start - offset, end - offset)
        extra = {}
        stack = getattr(emb, "decoder_kwargs", None) or {}
        if stack:
            extra = deepstack_piece(stack["visual_mask"], stack["deepstack"], start - offset, end - offset)
        logits, out = th.decode(
            emb.inputs_embeds[:, piece], emb.position_ids[:, :, piece], mask[:, start:end], state.cache,
            bool(self.keep_layers), logits_to_keep=1, **extra,
        )
        for layer, h in self._states(out).items():
            state.prompt_states.setdefault(layer, []).append(h)
        state.prefilled = end
        if end < inputs.length:
            return None
        state.position = emb.position_ids[:, :, -1:].to(self.device)
        state.embedded = None
        states = {layer: torch.cat(parts, dim=1) for layer, parts in state.prompt_states.items()}
        state.prompt_states = {}
        return ThinkerRead(index=-1, logits=logits[:, -1], states=states)

    def decode(
        self, cache: KVCache, tokens: torch.Tensor, positions: torch.Tensor, active: np.ndarray | None = None
    ) -> ThinkerRead:
        """One step of every row of ``cache``: read ``tokens`` [B] at ``positions`` [3, B, 1] (rows where the
        host mask ``active`` is False sit the step out: nothing is written for them)."""
        th = self.thinker
        embeds = th.model.embed_tokens(tokens[:, None].to(self.device))
        if active is None:
            logits, out = th.decode(embeds, positions, None, cache, bool(self.keep_layers), logits_to_keep=1)
        else:
            logits, out = th.decode(embeds, positions, None, cache, bool(self.keep_layers), logits_to_keep=1,
                                    active=active)  # fmt: skip
        return ThinkerRead(index=-1, logits=logits[:, -1], states=self._states(out))

    def step(self, state: ThinkerState, tokens: torch.Tensor) -> ThinkerRead:
        """Read answer token ``state.steps`` of every row (``tokens`` [B]); returns the logits of the next one."""
        state.position = state.position + 1
        read = self.decode(state.cache, tokens, state.position)
        read.index = state.steps
        state.steps += 1
        return read


def deepstack_piece(visual_mask: torch.Tensor, deepstack: list[torch.Tensor], start: int, end: int) -> dict:
    """The deepstack arguments for prompt positions ``[start, end)`` (Qwen3: features of the visual tokens there).

    ``deepstack[i]`` holds one row per visual token in row-major order of ``visual_mask`` [B, T].
    """
    if start == 0 and end == visual_mask.shape[1]:
        return {"visual_mask": visual_mask, "deepstack": deepstack}
    order = visual_mask.flatten().cumsum(0).view_as(visual_mask) - 1
    piece = visual_mask[:, start:end]
    picked = order[:, start:end][piece]
    return {"visual_mask": piece, "deepstack": [level[picked] for level in deepstack]}
