"""The Qwen3-Omni Thinker: AuT audio encoder + Qwen3-VL vision encoder feeding a Qwen3-MoE LLM.

Same seam as Qwen2.5-Omni: :meth:`Thinker.embed` turns token ids and media into input embeddings,
TMRoPE positions and the deepstack features (in ``decoder_kwargs``, used at prefill only);
:meth:`Thinker.decode` runs the LLM. ``Thinker.forward`` accepts the processor's output dict.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from thinktalk.models.items import Layout, layout, suffix_media
from thinktalk.models.qwen3_omni.aut import AudioEncoder
from thinktalk.models.qwen3_omni.config import MoEDecoderConfig, ThinkerConfig
from thinktalk.models.qwen3_omni.vision import VisionEncoder
from thinktalk.nn.cache import KVCache
from thinktalk.nn.decoder import Decoder, DecoderSpec
from thinktalk.nn.mlp import GatedMLP
from thinktalk.nn.moe import SparseMoE
from thinktalk.positions import TokenIds, aut_token_count, qwen3_rope_index


def qwen3_moe_decoder(cfg: MoEDecoderConfig, embed_name: str = "embed_tokens") -> Decoder:
    """The Qwen3-MoE decoder (QK-norm, interleaved TMRoPE, routed experts; dense SwiGLU in
    ``mlp_only_layers``): the Thinker's LLM, and with ``embed_name="codec_embedding"`` the Talker's body."""
    spec = DecoderSpec(
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta,
        mrope_section=tuple(cfg.mrope_section),
        mrope_interleaved=True,
        qkv_bias=cfg.attention_bias,
        o_bias=cfg.attention_bias,
        qk_norm=True,
        vocab_size=cfg.vocab_size,
        embed_name=embed_name,
    )

    def mlp(layer: int) -> nn.Module:
        if cfg.is_moe_layer(layer):
            return SparseMoE(
                cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts, cfg.num_experts_per_tok, cfg.norm_topk_prob,
                cfg.hidden_act, cfg.shared_expert_intermediate_size,
            )
        return GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)

    return Decoder(spec, mlp)


@dataclass
class ThinkerOutput:
    logits: torch.Tensor  # [B, T, V]
    last_hidden_state: torch.Tensor  # [B, T, H] after the final norm
    hidden_states: tuple[torch.Tensor, ...] | None  # (embeddings, layer 1, ..., final normed)
    position_ids: torch.Tensor  # [3, B, T] float32
    rope_deltas: torch.Tensor | None  # [B, 1]


@dataclass
class Embedded:
    inputs_embeds: torch.Tensor
    position_ids: torch.Tensor
    rope_deltas: torch.Tensor
    # Keyword arguments for the first ``decode`` call: {"visual_mask": [B, T] bool, "deepstack": [...]}.
    decoder_kwargs: dict = field(default_factory=dict)


class Thinker(nn.Module):
    def __init__(self, cfg: ThinkerConfig):
        super().__init__()
        self.cfg = cfg
        self.audio_tower = AudioEncoder(cfg.audio)
        self.visual = VisionEncoder(cfg.vision)
        self.model = qwen3_moe_decoder(cfg.text)
        self.lm_head = nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)
        self.token_ids = TokenIds(
            image=cfg.image_token_id,
            video=cfg.video_token_id,
            audio=cfg.audio_token_id,
            vision_start=cfg.vision_start_token_id,
            audio_start=cfg.audio_start_token_id,
        )

    # -- encoders -----------------------------------------------------------------------------------
    def audio_features(self, input_features: torch.Tensor, feature_attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, mel, frames] padded features + [B, frames] mask → [sum of audio tokens, H]."""
        lens = feature_attention_mask.sum(-1)
        feats = input_features.permute(0, 2, 1)[feature_attention_mask.bool()].permute(1, 0)
        return self.audio_tower(feats, lens)

    def image_features(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(LLM tokens, deepstack features) of images or videos."""
        return self.visual(pixel_values.to(self.visual.patch_embed.proj.weight.dtype), grid_thw)

    def rope_index(self, input_ids, attention_mask=None, image_grid_thw=None, video_grid_thw=None,
                   audio_feature_lengths=None, video_second_per_grid=None, use_audio_in_video=False):
        return qwen3_rope_index(
            input_ids,
            self.token_ids,
            attention_mask=attention_mask,
            image_grid_thw=image_grid_thw,
            video_grid_thw=video_grid_thw,
            audio_feature_lengths=audio_feature_lengths,
            video_second_per_grid=video_second_per_grid,
            use_audio_in_video=use_audio_in_video,
            spatial_merge_size=self.cfg.vision.spatial_merge_size,
            position_id_per_seconds=self.cfg.position_id_per_seconds,
            n_window=self.cfg.audio.n_window,
        )

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
        """Token embeddings with media features scattered into their placeholders, positions, deepstack.

        ``start`` > 0 (batch 1, on a media-item boundary) embeds only ``input_ids[:, start:]`` with the
        positions it has in the whole prompt (the engine's prefix reuse); see the Qwen2.5 Thinker.
        """
        if input_features is not None and feature_attention_mask is None:
            raise ValueError("input_features needs feature_attention_mask (as the processor returns)")
        full_ids, full_mask, audio_lens = input_ids, attention_mask, None
        if feature_attention_mask is not None:
            audio_lens = feature_attention_mask.sum(-1)
        grids = (image_grid_thw, video_grid_thw, video_second_per_grid)
        if start:
            media = {"input_features": input_features, "feature_attention_mask": feature_attention_mask,
                     "pixel_values": pixel_values, "image_grid_thw": image_grid_thw,
                     "pixel_values_videos": pixel_values_videos, "video_grid_thw": video_grid_thw}  # fmt: skip
            media = {k: v for k, v in media.items() if v is not None}
            media = suffix_media(input_ids, start, self.token_ids, media, self.media_layout(media))
            input_ids = input_ids[:, start:]
            input_features, feature_attention_mask = media.get("input_features"), media.get("feature_attention_mask")
            pixel_values, image_grid_thw = media.get("pixel_values"), media.get("image_grid_thw")
            pixel_values_videos, video_grid_thw = media.get("pixel_values_videos"), media.get("video_grid_thw")
        embeds = self.model.embed_tokens(input_ids)
        ids = self.token_ids

        def scatter(where: torch.Tensor, feats: torch.Tensor, what: str) -> None:
            nonlocal embeds
            n = int(where.sum())
            if n != feats.shape[0]:
                raise ValueError(f"{what}: {n} placeholder tokens in input_ids but {feats.shape[0]} feature tokens")
            embeds = embeds.masked_scatter(where[..., None], feats.to(embeds.dtype))

        if input_features is not None:
            scatter(input_ids == ids.audio, self.audio_features(input_features, feature_attention_mask), "audio")
        image_mask = input_ids == ids.image
        video_mask = input_ids == ids.video
        stacks = {}
        if pixel_values is not None:
            feats, stacks["image"] = self.image_features(pixel_values, image_grid_thw)
            scatter(image_mask, feats, "image")
        if pixel_values_videos is not None:
            feats, stacks["video"] = self.image_features(pixel_values_videos, video_grid_thw)
            scatter(video_mask, feats, "video")
        decoder_kwargs = {}
        if stacks:
            # Deepstack features of the visual tokens in sequence order (images and videos interleaved).
            visual_mask = torch.zeros_like(image_mask)
            if "image" in stacks:
                visual_mask |= image_mask
            if "video" in stacks:
                visual_mask |= video_mask
            is_image = image_mask[visual_mask]
            levels = len(next(iter(stacks.values())))
            deepstack = []
            for level in range(levels):
                ref = next(iter(stacks.values()))[level]
                joint = ref.new_zeros(int(visual_mask.sum()), ref.shape[-1])
                if "image" in stacks:
                    joint[is_image] = stacks["image"][level]
                if "video" in stacks:
                    joint[~is_image] = stacks["video"][level]
                deepstack.append(joint)
            decoder_kwargs = {"visual_mask": visual_mask, "deepstack": deepstack}
        positions, deltas = self.rope_index(full_ids, full_mask, *grids[:2], audio_lens, grids[2], use_audio_in_video)
        return Embedded(embeds, positions[:, :, start:], deltas, decoder_kwargs)

    def media_layout(self, media: dict) -> Layout:
        """Placeholder tokens per media item of a prompt (see :mod:`thinktalk.models.items`)."""
        n_window = self.cfg.audio.n_window
        return layout(media, lambda frames: aut_token_count(frames, n_window), self.cfg.vision.spatial_merge_size)

    @property
    def audio_block(self) -> tuple[int, int] | None:
        """(mel frames, audio tokens) of one AuT attention window: ``n_window_infer`` frames of whole conv chunks
        (each convolved and position-embedded alone, full chunks unpadded), attended within; a clip's complete
        windows give the same tokens whatever follows (the engine reuses them while a clip grows)."""
        a = self.cfg.audio
        chunk = 2 * a.n_window
        if a.n_window_infer % chunk:
            return None
        return a.n_window_infer, aut_token_count(chunk, a.n_window) * (a.n_window_infer // chunk)

    def decode(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        output_hidden_states: bool = False,
        logits_to_keep: int = 0,
        visual_mask: torch.Tensor | None = None,
        deepstack: list[torch.Tensor] | None = None,
        active=None,
    ):
        """Run the LLM. Returns (logits, decoder output). ``logits_to_keep=1`` computes only the last position;
        ``active``: the exec mask of the cache rows (see :meth:`Decoder.forward`)."""
        out = self.model(inputs_embeds, position_ids, attention_mask, cache, output_hidden_states, visual_mask, deepstack,
                         active)  # fmt: skip
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
        logits, out = self.decode(
            emb.inputs_embeds, positions, attention_mask, cache, output_hidden_states, **emb.decoder_kwargs
        )
        return ThinkerOutput(
            logits=logits,
            last_hidden_state=out.last_hidden_state,
            hidden_states=out.hidden_states,
            position_ids=positions,
            rope_deltas=emb.rope_deltas,
        )
