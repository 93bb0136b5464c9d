"""The Qwen2.5-Omni Thinker: audio + vision encoders feeding a Qwen2.5 LLM through placeholder tokens.

The seam is explicit: :meth:`Thinker.embed` turns token ids and media into input embeddings and
TMRoPE positions; :meth:`Thinker.decode` runs the LLM on embeddings + positions (+ a KV cache).
``Thinker.forward`` accepts the processor's output dict (reference key names) and does both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from thinktalk.models.items import Layout, layout, suffix_media
from thinktalk.models.qwen2_5_omni.audio import AudioEncoder
from thinktalk.models.qwen2_5_omni.config import ThinkerConfig
from thinktalk.models.qwen2_5_omni.vision import VisionEncoder
from thinktalk.nn.cache import KVCache
from thinktalk.nn.decoder import Decoder, DecoderSpec
from thinktalk.nn.mlp import GatedMLP
from thinktalk.positions import TokenIds, audio_token_count, rope_index


def qwen2_decoder(cfg, vocab_size: int, embed_dim: int | None = None) -> Decoder:
    """The Qwen2 decoder (q/k/v biases, SwiGLU, contiguous TMRoPE) of a TextConfig or a TalkerConfig."""
    spec = DecoderSpec(
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta,
        mrope_section=tuple(cfg.mrope_section),
        qkv_bias=True,
        vocab_size=vocab_size,
        embed_dim=embed_dim,
    )
    return Decoder(spec, lambda layer: GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act))


@dataclass
class ThinkerOutput:
    logits: torch.Tensor  # [B, T, V]
    last_hidden_state: torch.Tensor  # [B, T, H] after the final norm
    hidden_states: tuple[torch.Tensor, ...] | None  # (embeddings, layer 1, ..., final normed)
    position_ids: torch.Tensor  # [3, B, T]
    rope_deltas: torch.Tensor | None  # [B, 1], when positions were computed here


@dataclass
class Embedded:
    inputs_embeds: torch.Tensor
    position_ids: torch.Tensor
    rope_deltas: torch.Tensor


class Thinker(nn.Module):
    def __init__(self, cfg: ThinkerConfig):
        super().__init__()
        self.cfg = cfg
        self.audio_tower = AudioEncoder(cfg.audio)
        self.visual = VisionEncoder(cfg.vision)
        self.model = qwen2_decoder(cfg.text, cfg.text.vocab_size)
        self.lm_head = nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)
        self.token_ids = TokenIds(
            image=cfg.image_token_index,
            video=cfg.video_token_index,
            audio=cfg.audio_token_index,
            vision_start=cfg.vision_start_token_id,
            audio_start=cfg.audio_start_token_id,
        )

    # -- encoders -----------------------------------------------------------------------------------
    def audio_features(self, input_features: torch.Tensor, feature_attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, mel, frames] padded features + [B, frames] mask → [sum of audio tokens, H]."""
        lens = feature_attention_mask.sum(-1)
        feats = input_features.permute(0, 2, 1)[feature_attention_mask.bool()].permute(1, 0)
        out = self.audio_tower(feats, lens)
        expected = sum(audio_token_count(n) for n in lens.tolist())
        if out.shape[0] != expected:
            raise RuntimeError(f"audio encoder produced {out.shape[0]} tokens, expected {expected}")
        return out

    def image_features(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        return self.visual(pixel_values.to(self.visual.patch_embed.proj.weight.dtype), grid_thw)

    # -- the seam ---------------------------------------------------------------------------------
    def embed(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        input_features: torch.Tensor | None = None,
        feature_attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        video_second_per_grid: torch.Tensor | None = None,
        use_audio_in_video: bool = False,
        start: int = 0,
    ) -> Embedded:
        """Token embeddings with media features scattered into their placeholders, plus TMRoPE positions.

        ``start`` > 0 (batch 1, on a media-item boundary: :func:`thinktalk.models.items.item_boundary`)
        embeds only ``input_ids[:, start:]`` — the encoders see only the media of that part — with the
        positions it has in the whole prompt (the engine's prefix reuse).
        """
        if input_features is not None and feature_attention_mask is None:
            raise ValueError("input_features needs feature_attention_mask (as the processor returns)")
        media = {"input_features": input_features, "feature_attention_mask": feature_attention_mask,
                 "pixel_values": pixel_values, "image_grid_thw": image_grid_thw,
                 "pixel_values_videos": pixel_values_videos, "video_grid_thw": video_grid_thw}  # fmt: skip
        media = {k: v for k, v in media.items() if v is not None}
        part = input_ids
        if start:
            media = suffix_media(input_ids, start, self.token_ids, media, self.media_layout(media))
            part = input_ids[:, start:]
        embeds = self.model.embed_tokens(part)
        ids = self.token_ids

        def scatter(token: int, feats: torch.Tensor, what: str) -> None:
            nonlocal embeds
            where = part == token
            n = int(where.sum())
            if n != feats.shape[0]:
                raise ValueError(f"{what}: {n} placeholder tokens in input_ids but {feats.shape[0]} feature tokens")
            embeds = embeds.masked_scatter(where[..., None], feats.to(embeds.dtype))

        if "input_features" in media:
            scatter(ids.audio, self.audio_features(media["input_features"], media["feature_attention_mask"]), "audio")
        if "pixel_values" in media:
            scatter(ids.image, self.image_features(media["pixel_values"], media["image_grid_thw"]), "image")
        if "pixel_values_videos" in media:
            scatter(ids.video, self.image_features(media["pixel_values_videos"], media["video_grid_thw"]), "video")
        audio_lens = None if feature_attention_mask is None else feature_attention_mask.sum(-1)
        positions, deltas = rope_index(
            input_ids,
            ids,
            attention_mask=attention_mask,
            image_grid_thw=image_grid_thw,
            video_grid_thw=video_grid_thw,
            audio_feature_lengths=audio_lens,
            video_second_per_grid=video_second_per_grid,
            use_audio_in_video=use_audio_in_video,
            spatial_merge_size=self.cfg.vision.spatial_merge_size,
            position_id_per_seconds=self.cfg.position_id_per_seconds,
            seconds_per_chunk=self.cfg.seconds_per_chunk,
        )
        return Embedded(embeds, positions[:, :, start:], deltas)

    def media_layout(self, media: dict) -> Layout:
        """Placeholder tokens per media item of a prompt (see :mod:`thinktalk.models.items`)."""
        return layout(media, audio_token_count, self.cfg.vision.spatial_merge_size)

    @property
    def audio_block(self) -> tuple[int, int] | None:
        """(mel frames, audio tokens) of one audio-encoder window: the encoder convolves, embeds positions and
        attends within each window of ``2·n_window`` frames, and the ×2 pooling pairs stay inside a window when
        ``n_window`` is even, so the tokens of a clip's complete windows depend on those frames only (the
        engine reuses them while a clip grows: realtime input)."""
        n = self.cfg.audio.n_window
        return None if n % 2 else (2 * n, n // 2)

    def decode(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        output_hidden_states: bool = False,
        logits_to_keep: int = 0,
        active=None,
    ):
        """Run the LLM. Returns (logits, decoder output). ``logits_to_keep=1`` computes only the last position;
        ``active``: the exec mask of the cache rows (see :meth:`Decoder.forward`)."""
        out = self.model(inputs_embeds, position_ids, attention_mask, cache, output_hidden_states, active=active)
        h = out.last_hidden_state if logits_to_keep == 0 else out.last_hidden_state[:, -logits_to_keep:]
        return self.lm_head(h), out

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        input_features: torch.Tensor | None = None,
        feature_attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        video_second_per_grid: torch.Tensor | None = None,
        use_audio_in_video: bool = False,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        output_hidden_states: bool = False,
    ) -> ThinkerOutput:
        emb = self.embed(
            input_ids, attention_mask, input_features, feature_attention_mask, pixel_values, image_grid_thw,
            pixel_values_videos, video_grid_thw, video_second_per_grid, use_audio_in_video,
        )
        positions = emb.position_ids if position_ids is None else position_ids
        logits, out = self.decode(emb.inputs_embeds, positions, attention_mask, cache, output_hidden_states)
        return ThinkerOutput(
            logits=logits,
            last_hidden_state=out.last_hidden_state,
            hidden_states=out.hidden_states,
            position_ids=positions,
            rope_deltas=emb.rope_deltas,
        )
