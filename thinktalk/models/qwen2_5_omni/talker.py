"""The Qwen2.5-Omni Talker: a dual-track decoder that turns the Thinker's answer into speech codec ids.

Every Talker position adds two tracks in the Thinker's embedding space (``embedding_size`` = the
Thinker width), then projects them to the Talker width (``thinker_to_talker_proj``):

- the **text track**: what the Thinker read there — its last hidden state plus its input embedding;
- the **codec track**: the embedding of a codec token (``talker.model.embed_tokens``, vocab 8448).

The prompt, exactly as the reference builds it (T = prompt length, R_k = the text track of the
Thinker's k-th answer token: its last hidden state + its token embedding)::

    position   0 .. T-1                   T                                   T+1
    text       prompt hidden + embedding  embed(speaker's text-bos token)     R_0
               (media placeholders: hidden state only, the embedding zeroed)
    codec      (none)                     embed(codec pad)                    embed(codec bos)

Decode step k ≥ 1 reads ``embed(code_{k-1}) + R_k``, where R_k past the answer is the embedding of the
text-eos token (once, right after the last answer token the Thinker read) and then of the text-pad token
forever. Code 0 comes from the prompt. Positions are TMRoPE positions of the prompt ids followed by the
speaker bos and the first answer token (the same computation as the Thinker's), then +1 per step.
Codec generation stops at codec pad (8292) or codec eos (8294); codec bos is never sampled.

The generation stage around this module (state, prefill, step, sampling) is
:class:`thinktalk.models.qwen2_5_omni.speech.TalkerStage`; :func:`prompt_embeds` builds its prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from thinktalk.generation.sampling import SamplingParams
from thinktalk.models.qwen2_5_omni.config import TalkerConfig
from thinktalk.models.qwen2_5_omni.thinker import qwen2_decoder
from thinktalk.nn.cache import KVCache
from thinktalk.positions import TokenIds, rope_index

# The reference's defaults for the Talker (Qwen2_5OmniForConditionalGeneration.generate).
TALKER_DEFAULTS = SamplingParams(do_sample=True, temperature=0.9, top_k=40, top_p=0.8, repetition_penalty=1.05)


class Talker(nn.Module):
    def __init__(self, cfg: TalkerConfig):
        super().__init__()
        self.cfg = cfg
        self.thinker_to_talker_proj = nn.Linear(cfg.embedding_size, cfg.hidden_size)
        self.model = qwen2_decoder(cfg, cfg.vocab_size, embed_dim=cfg.embedding_size)
        self.codec_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.token_ids = TokenIds(
            image=cfg.image_token_index,
            video=cfg.video_token_index,
            audio=cfg.audio_token_index,
            vision_start=cfg.vision_start_token_id,
            audio_start=cfg.audio_start_token_id,
        )

    @property
    def eos_token_ids(self) -> tuple[int, int]:
        """Codec pad and codec eos both end an utterance (the reference's ``talker_eos_token_id``)."""
        return (self.cfg.tts_codec_pad_token_id, self.cfg.tts_codec_end_token_id)

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(codes)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        active=None,
    ) -> torch.Tensor:
        """inputs_embeds [B, T, embedding_size] (text + codec tracks summed) → codec logits [B, T, vocab] (float32)."""
        out = self.model(self.thinker_to_talker_proj(inputs_embeds), position_ids, attention_mask, cache, active=active)
        return self.codec_head(out.last_hidden_state).float()

    def positions(
        self,
        text_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        audio_feature_lengths: torch.Tensor | None = None,
        video_second_per_grid: torch.Tensor | None = None,
        use_audio_in_video: bool = False,
    ) -> torch.Tensor:
        """TMRoPE positions [3, B, T] of the Talker prompt's text ids (prompt + speaker bos + first answer token)."""
        positions, _ = rope_index(
            text_ids,
            self.token_ids,
            attention_mask=attention_mask,
            image_grid_thw=image_grid_thw,
            video_grid_thw=video_grid_thw,
            audio_feature_lengths=audio_feature_lengths,
            video_second_per_grid=video_second_per_grid,
            use_audio_in_video=use_audio_in_video,
            spatial_merge_size=self.cfg.spatial_merge_size,
            position_id_per_seconds=self.cfg.position_id_per_seconds,
            seconds_per_chunk=self.cfg.seconds_per_chunk,
        )
        return positions


@dataclass
class TalkerPrompt:
    inputs_embeds: torch.Tensor  # [B, T + 2, E]
    position_ids: torch.Tensor  # [3, B, T + 2]
    attention_mask: torch.Tensor  # [B, T + 2]
    codec_ids: torch.Tensor  # [B, T + 2]: mask ×T, pad, bos (the repetition penalty sees them)


def prompt_embeds(
    talker: Talker,
    thinker_embed: nn.Embedding,
    prompt_ids: torch.Tensor,
    prompt_states: dict[int, torch.Tensor],
    media_mask: torch.Tensor,
    first_reply: torch.Tensor,
    first_token: torch.Tensor,
    speaker_bos: int,
    attention_mask: torch.Tensor | None = None,
    reference_quirks: bool = False,
    **media,
) -> TalkerPrompt:
    """The Talker prompt (see the module docstring).

    ``prompt_states``: the Thinker's {0: input embeddings, -1: last hidden state} of the prompt, [B, T, E];
    ``media_mask`` [B, T]: placeholder positions whose embeddings the Talker does not see;
    ``first_reply`` [B, 1, E]: R_0; ``first_token`` [B]: the first answer token (for positions);
    ``media``: image_grid_thw, video_grid_thw, audio_feature_lengths, video_second_per_grid, use_audio_in_video.

    ``reference_quirks`` reproduces transformers 5.23 on unpadded input: its ``generate()`` drops an all-ones
    attention mask, and without one the reference Talker skips its prompt set-up — no codec pad/bos
    embeddings, plain sequential positions instead of TMRoPE. The checkpoints were trained with both
    (earlier transformers passed the mask, and 5.23 still does when there is padding), so it is off by default.
    """
    b, t = prompt_ids.shape
    device = first_reply.device
    embeds = prompt_states[0].masked_fill(media_mask[..., None].to(device), 0)
    text = prompt_states[-1] + embeds
    bos = thinker_embed(torch.full((b, 1), speaker_bos, dtype=torch.long, device=device)).to(text.dtype)
    cfg = talker.cfg
    codec = talker.embed_codes(torch.tensor([cfg.tts_codec_pad_token_id, cfg.tts_codec_start_token_id], device=device))
    mask = torch.ones(b, t, dtype=torch.long, device=prompt_ids.device) if attention_mask is None else attention_mask
    mask = torch.cat([mask, mask.new_ones(b, 2)], dim=1)
    quirk = reference_quirks and bool(mask.all())
    tail = torch.cat([bos, first_reply.to(text.dtype)], dim=1)
    if not quirk:
        tail = tail + codec.to(text.dtype)[None]
    inputs_embeds = torch.cat([text, tail], dim=1)
    text_ids = torch.cat(
        [prompt_ids, torch.full((b, 1), speaker_bos, dtype=prompt_ids.dtype, device=prompt_ids.device),
         first_token.reshape(b, 1).to(prompt_ids)],
        dim=1,
    )
    if quirk:
        positions = torch.arange(t + 2, device=prompt_ids.device).view(1, 1, -1).expand(3, b, -1)
    else:
        positions = talker.positions(text_ids, mask, **media)
    codec_ids = torch.cat(
        [torch.full((b, t), cfg.tts_codec_mask_token_id, dtype=torch.long),
         torch.tensor([[cfg.tts_codec_pad_token_id, cfg.tts_codec_start_token_id]]).expand(b, -1)],
        dim=1,
    ).to(device)
    return TalkerPrompt(inputs_embeds, positions.to(device), mask.to(device), codec_ids)


def utterance_lengths(codes: torch.Tensor, eos: tuple[int, ...]) -> list[int]:
    """Codes before the first end token of each row of ``codes`` [B, N].

    >>> utterance_lengths(torch.tensor([[5, 8292, 8292], [1, 2, 3]]), (8292, 8294))
    [1, 3]
    """
    out = []
    for row in codes.tolist():
        out.append(next((i for i, c in enumerate(row) if c in eos), len(row)))
    return out
