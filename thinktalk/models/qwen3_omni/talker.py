"""The Qwen3-Omni Talker: an MoE decoder that speaks codebook 0 of every 80 ms frame.

It does not read the Thinker's text tokens as such. Its prompt is built from the Thinker:

* user turns: text tokens as ``text_projection(token embedding)``, audio/image/video placeholders as
  ``hidden_projection(Thinker hidden state at accept_hidden_layer)`` (multimodal features);
* the Thinker's system turn is left out — the Talker has its own (optional) system prompt;
* the assistant turn, two tracks summed position by position::

      text : a0    a1    a2    pad    pad      pad      pad      tts_bos   t0
      codec: 0     0     0     nothink think_bos think_eos speaker codec_pad codec_bos

  (a0..a2 = "<|im_start|>assistant\\n", t0 the first answer token, all through text_projection).

Each decode step then reads the sum of the previous frame's G code embeddings plus the next answer
token (``text_projection``), ``tts_eos`` after the last one and ``tts_pad`` afterwards; the code
predictor fills in codebooks 1..G-1 of each frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from thinktalk.models.qwen3_omni.code_predictor import CodePredictor
from thinktalk.models.qwen3_omni.config import TalkerConfig
from thinktalk.models.qwen3_omni.thinker import qwen3_moe_decoder
from thinktalk.nn.cache import KVCache
from thinktalk.nn.mlp import activation
from thinktalk.positions import TokenIds, qwen3_rope_index

ASSISTANT_HEAD = 3  # "<|im_start|>", "assistant", "\n" before the answer


class ResizeMLP(nn.Module):
    """Thinker width → Talker width (two linear layers with biases)."""

    def __init__(self, dim_in: int, hidden: int, dim_out: int, act: str):
        super().__init__()
        self.linear_fc1 = nn.Linear(dim_in, hidden)
        self.linear_fc2 = nn.Linear(hidden, dim_out)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(self.act(self.linear_fc1(x)))


@dataclass
class TalkerPrompt:
    embeds: torch.Tensor  # [1, P, D]
    position_ids: torch.Tensor  # [3, 1, P] float32


def user_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor, im_start: int, user: int) -> torch.Tensor:
    """[B, T] bool: the tokens of user turns (from their <|im_start|> up to the next one)."""
    t = input_ids.shape[1]
    pos = torch.arange(t, device=input_ids.device).expand_as(input_ids)
    starts = torch.where(input_ids == im_start, pos, torch.full_like(pos, -1))
    current = torch.cummax(starts, dim=-1).values.clamp_min(0)
    role = input_ids.gather(1, (current + 1).clamp_max(t - 1))
    return (role == user) & attention_mask.bool()


def last_assistant_start(input_ids: torch.Tensor, im_start: int, assistant: int) -> int:
    """Index of the last "<|im_start|>assistant" of row 0 (where the answer's turn begins)."""
    hits = ((input_ids[0, :-1] == im_start) & (input_ids[0, 1:] == assistant)).nonzero().flatten()
    if len(hits) == 0:
        raise ValueError("the prompt has no '<|im_start|>assistant' turn (use the chat template with add_generation_prompt)")
    return int(hits[-1])


class Talker(nn.Module):
    def __init__(self, cfg: TalkerConfig):
        super().__init__()
        self.cfg = cfg
        t = cfg.text
        self.model = qwen3_moe_decoder(t, embed_name="codec_embedding")
        self.text_projection = ResizeMLP(cfg.thinker_hidden_size, t.intermediate_size, t.hidden_size, t.hidden_act)
        self.hidden_projection = ResizeMLP(cfg.thinker_hidden_size, t.intermediate_size, t.hidden_size, t.hidden_act)
        self.codec_head = nn.Linear(t.hidden_size, t.vocab_size, bias=False)
        self.code_predictor = CodePredictor(cfg.code_predictor)
        self.token_ids = TokenIds(
            image=cfg.image_token_id,
            video=cfg.video_token_id,
            audio=cfg.audio_token_id,
            vision_start=cfg.vision_start_token_id,
            audio_start=cfg.audio_start_token_id,
        )

    def suppressed_tokens(self) -> tuple[int, ...]:
        """The codec vocabulary's top 1024 ids are control tokens; only codec EOS may be generated."""
        v = self.cfg.text.vocab_size
        return tuple(i for i in range(max(0, v - 1024), v) if i != self.cfg.codec_eos_token_id)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        return self.model.new_cache(batch, max_len)

    def decode(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache: KVCache | None,
        active=None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """→ (codec logits of the last position [B, V], normed hidden state of the last position [B, 1, D])."""
        out = self.model(inputs_embeds, position_ids, attention_mask, cache, active=active)
        last = out.last_hidden_state[:, -1:]
        return self.codec_head(last[:, 0]), last

    def build_prompt(
        self,
        *,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        thinker_embeds: torch.Tensor,
        thinker_hidden: torch.Tensor,
        answer_embeds: torch.Tensor,
        special_embeds: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        speaker_id: int,
        ids: dict[str, int],
        media: dict,
        n_window: int,
        system_embeds: torch.Tensor | None = None,
    ) -> TalkerPrompt:
        """The Talker's prefill for one conversation (batch 1).

        ``thinker_embeds`` / ``thinker_hidden`` [1, T, Hth]: the Thinker's input embeddings and its hidden
        states at ``accept_hidden_layer`` over the prompt; ``answer_embeds`` [1, A, Hth] token embeddings of
        the answer's first tokens (only the first is used; A may be 0 when the prompt already holds it);
        ``special_embeds``: Thinker embeddings of (tts_bos, tts_eos, tts_pad) [1, 1, Hth] each;
        ``ids``: im_start / user / assistant / tts_pad token ids; ``media``: the processor's grids and
        ``feature_attention_mask`` (for positions); ``system_embeds`` [1, S, Hth]: the Talker's own system
        prompt (token embeddings), prepended as text.
        """
        if input_ids.shape[0] != 1:
            raise ValueError("the Talker speaks one conversation at a time (batch size 1)")
        device = thinker_embeds.device
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        users = user_mask(input_ids, attention_mask, ids["im_start"], ids["user"])[0]
        tid = self.token_ids
        mm = (input_ids[0] == tid.audio) | (input_ids[0] == tid.image) | (input_ids[0] == tid.video)
        user_embeds = torch.empty(int(users.sum()), self.cfg.text.hidden_size, dtype=thinker_embeds.dtype, device=device)
        sel_mm = mm[users]
        if bool(sel_mm.any()):
            user_embeds[sel_mm] = self.hidden_projection(thinker_hidden[0][users][sel_mm])
        user_embeds[~sel_mm] = self.text_projection(thinker_embeds[0][users][~sel_mm])
        user_ids = input_ids[0][users]

        start = last_assistant_start(input_ids, ids["im_start"], ids["assistant"])
        stream = torch.cat([thinker_embeds[:, start:], answer_embeds], dim=1)  # the assistant turn's tokens
        if stream.shape[1] < ASSISTANT_HEAD + 1:
            raise ValueError("the Talker needs the answer's first token (generate at least one text token)")
        head = self.text_projection(stream[:, : ASSISTANT_HEAD + 1])
        tts_bos, tts_eos, tts_pad = (self.text_projection(e) for e in special_embeds)
        text_track = torch.cat([head[:, :ASSISTANT_HEAD], tts_pad.expand(1, 4, -1), tts_bos, head[:, ASSISTANT_HEAD:]], dim=1)
        c = self.cfg
        codec_ids = torch.tensor(
            [[c.codec_nothink_id, c.codec_think_bos_id, c.codec_think_eos_id, speaker_id, c.codec_pad_id, c.codec_bos_id]],
            device=device,
        )
        codec_track = torch.cat(
            [text_track.new_zeros(1, ASSISTANT_HEAD, text_track.shape[-1]), self.model.codec_embedding(codec_ids)], dim=1
        )
        parts = [user_embeds[None], text_track + codec_track]
        pos_ids = [user_ids, torch.full((text_track.shape[1],), ids["tts_pad"], device=device, dtype=user_ids.dtype)]
        if system_embeds is not None:
            parts.insert(0, self.text_projection(system_embeds))
            pos_ids.insert(0, torch.full((system_embeds.shape[1],), ids["tts_pad"], device=device, dtype=user_ids.dtype))
        embeds = torch.cat(parts, dim=1)
        talker_ids = torch.cat(pos_ids)[None]
        fam = media.get("feature_attention_mask")
        # The reference gives the Talker's positions the grids and audio lengths but not
        # use_audio_in_video (always False there); matched.
        positions, _ = qwen3_rope_index(
            talker_ids,
            tid,
            image_grid_thw=media.get("image_grid_thw"),
            video_grid_thw=media.get("video_grid_thw"),
            audio_feature_lengths=fam.sum(-1) if fam is not None else None,
            video_second_per_grid=media.get("video_second_per_grid"),
            use_audio_in_video=False,
            spatial_merge_size=c.spatial_merge_size,
            position_id_per_seconds=c.position_id_per_seconds,
            n_window=n_window,
        )
        return TalkerPrompt(embeds=embeds, position_ids=positions.to(device))
