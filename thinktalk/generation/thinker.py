"""Thinker text generation as an explicit session: prefill, then one decode step per token.

The session owns its state (KV cache, attention mask, last positions, history) and yields one
:class:`TextStep` per generated token, so consumers (the text streamer, the Talker stage) can act on
every token as soon as it exists. Hidden states of chosen layers ride along with each step: the
Talker is conditioned on them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from thinktalk.generation.sampling import SamplingParams, choose
from thinktalk.nn.cache import KVCache

MEDIA_KEYS = (
    "input_features",
    "feature_attention_mask",
    "pixel_values",
    "image_grid_thw",
    "pixel_values_videos",
    "video_grid_thw",
    "video_second_per_grid",
)


@dataclass
class TextStep:
    index: int  # 0 for the token chosen after the prompt
    tokens: torch.Tensor  # [B] chosen tokens (pad for rows already finished)
    finished: torch.Tensor  # [B] bool: the row has produced an end token (this one included)
    # Hidden states (by layer index) of what the LLM just read: the prompt at step 0 ([B, T, H]),
    # the previous step's token afterwards ([B, 1, H]). Layer 0 is the input embedding.
    states: dict[int, torch.Tensor]


class ThinkerSession:
    def __init__(
        self,
        thinker,
        inputs: dict,
        max_new_tokens: int,
        sampling: SamplingParams,
        eos_token_ids: tuple[int, ...],
        pad_token_id: int | None = None,
        keep_layers: tuple[int, ...] = (),
        use_audio_in_video: bool = False,
        generator: torch.Generator | None = None,
    ):
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1 (got {max_new_tokens})")
        self.thinker = thinker
        self.inputs = inputs
        self.max_new_tokens = max_new_tokens
        self.sampling = sampling
        self.eos = torch.tensor(list(eos_token_ids) or [-1])
        self.pad = pad_token_id if pad_token_id is not None else (eos_token_ids[0] if eos_token_ids else 0)
        self.keep_layers = keep_layers
        self.use_audio_in_video = use_audio_in_video
        self.generator = generator
        self.cache: KVCache | None = None
        self.generated: list[torch.Tensor] = []
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def _states(self, out) -> dict[int, torch.Tensor]:
        if not self.keep_layers:
            return {}
        hs = out.hidden_states
        return {layer: hs[layer] for layer in self.keep_layers}

    @torch.inference_mode()
    def __iter__(self) -> Iterator[TextStep]:
        th = self.thinker
        input_ids = self.inputs["input_ids"]
        device = th.lm_head.weight.device
        input_ids = input_ids.to(device)
        mask = self.inputs.get("attention_mask")
        mask = torch.ones_like(input_ids) if mask is None else mask.to(device)
        media = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in self.inputs.items() if k in MEDIA_KEYS}
        emb = th.embed(input_ids, mask, use_audio_in_video=self.use_audio_in_video, **media)
        b, t = input_ids.shape
        self.cache = th.model.new_cache(b, t + self.max_new_tokens)
        want_hidden = bool(self.keep_layers)
        logits, out = th.decode(
            emb.inputs_embeds, emb.position_ids, mask, self.cache, want_hidden, logits_to_keep=1,
            **getattr(emb, "decoder_kwargs", {}),
        )
        states = self._states(out)
        last_pos = emb.position_ids[:, :, -1:].to(device)
        history = input_ids
        finished = torch.zeros(b, dtype=torch.bool, device=device)
        eos = self.eos.to(device)
        for step in range(self.max_new_tokens):
            tok = choose(logits[:, -1], history, self.sampling, self.generator)
            tok = torch.where(finished, torch.full_like(tok, self.pad), tok)
            finished = finished | torch.isin(tok, eos)
            self.generated.append(tok)
            history = torch.cat([history, tok[:, None]], dim=1)
            yield TextStep(index=step, tokens=tok, finished=finished.clone(), states=states)
            if bool(finished.all()) or step + 1 == self.max_new_tokens or self.cancelled:
                return
            last_pos = last_pos + 1
            mask = torch.cat([mask, mask.new_ones(b, 1)], dim=1)
            embeds = th.model.embed_tokens(tok[:, None])
            logits, out = th.decode(embeds, last_pos, mask, self.cache, want_hidden, logits_to_keep=1)
            states = self._states(out)

    def sequences(self) -> torch.Tensor:
        """[B, generated] token ids so far."""
        if not self.generated:
            return torch.zeros(self.inputs["input_ids"].shape[0], 0, dtype=torch.long)
        return torch.stack(self.generated, dim=1)
