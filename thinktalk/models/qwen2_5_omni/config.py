"""Qwen2.5-Omni configuration: one frozen dataclass per component, built from ``config.json``.

Field names are the checkpoint's own names so a reader can grep from ``config.json`` to code.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from thinktalk.config import ConfigError, divisible, field_value, from_dict, rope_settings, sub


@dataclass(frozen=True)
class TextConfig:
    """The Qwen2.5 decoder LLM inside the Thinker."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    use_sliding_window: bool = False
    sliding_window: int | None = None
    max_window_layers: int = 28
    rope_theta: float = 1e6
    mrope_section: tuple[int, ...] = (16, 24, 24)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, d: dict, where: str = "thinker_config.text_config") -> TextConfig:
        theta, section, _ = rope_settings(d, 1e6, where)
        cfg = from_dict(cls, d, where, rope_theta=theta, mrope_section=section or (16, 24, 24))
        if sum(cfg.mrope_section) * 2 != cfg.head_dim:
            raise ConfigError(
                f"{where}: mrope_section {list(cfg.mrope_section)} must sum to head_dim/2 = {cfg.head_dim // 2}"
            )
        if cfg.use_sliding_window:
            raise ConfigError(f"{where}.use_sliding_window=true is not supported (no released checkpoint uses it)")
        return cfg


@dataclass(frozen=True)
class AudioEncoderConfig:
    """Whisper-style audio encoder with block attention (``n_window``) and ×2 average pooling."""

    num_mel_bins: int
    encoder_layers: int
    encoder_attention_heads: int
    encoder_ffn_dim: int
    d_model: int
    output_dim: int
    n_window: int = 100
    max_source_positions: int = 1500
    activation_function: str = "gelu"
    scale_embedding: bool = False

    @classmethod
    def from_hf(cls, d: dict, where: str = "thinker_config.audio_config") -> AudioEncoderConfig:
        cfg = from_dict(cls, d, where)
        divisible(where, "d_model", cfg.d_model, "encoder_attention_heads", cfg.encoder_attention_heads)
        return cfg


@dataclass(frozen=True)
class VisionEncoderConfig:
    """Qwen2.5-VL ViT: 3D patch embed, 2D rotary, window + full attention, 2×2 merger."""

    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    hidden_act: str = "silu"
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf(cls, d: dict, where: str = "thinker_config.vision_config") -> VisionEncoderConfig:
        theta, _, _ = rope_settings(d, 10000.0, where)
        cfg = from_dict(cls, d, where, rope_theta=theta)
        divisible(where, "hidden_size", cfg.hidden_size, "num_heads", cfg.num_heads)
        return cfg


@dataclass(frozen=True)
class ThinkerConfig:
    text: TextConfig
    audio: AudioEncoderConfig
    vision: VisionEncoderConfig
    audio_token_index: int = 151646
    image_token_index: int = 151655
    video_token_index: int = 151656
    audio_start_token_id: int = 151647
    audio_end_token_id: int = 151648
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    position_id_per_seconds: int = 25
    seconds_per_chunk: int = 2
    user_token_id: int = 872
    tie_word_embeddings: bool = False

    @classmethod
    def from_hf(cls, d: dict, where: str = "thinker_config") -> ThinkerConfig:
        return from_dict(
            cls,
            d,
            where,
            text=TextConfig.from_hf(sub(d, "text_config", where), f"{where}.text_config"),
            audio=AudioEncoderConfig.from_hf(sub(d, "audio_config", where), f"{where}.audio_config"),
            vision=VisionEncoderConfig.from_hf(sub(d, "vision_config", where), f"{where}.vision_config"),
        )


@dataclass(frozen=True)
class TalkerConfig:
    """The dual-track Talker: reads Thinker states + token embeddings, emits codec tokens."""

    vocab_size: int
    embedding_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    rope_theta: float = 1e6
    mrope_section: tuple[int, ...] = (16, 24, 24)
    tts_text_start_token_id: int = 151860
    tts_text_end_token_id: int = 151861
    tts_text_pad_token_id: int = 151859
    tts_codec_start_token_id: int = 8293
    tts_codec_end_token_id: int = 8294
    tts_codec_pad_token_id: int = 8292
    tts_codec_mask_token_id: int = 8296
    audio_token_index: int = 151646
    image_token_index: int = 151655
    video_token_index: int = 151656
    audio_start_token_id: int = 151647
    audio_end_token_id: int = 151648
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    position_id_per_seconds: int = 25
    seconds_per_chunk: int = 2
    spatial_merge_size: int = 2

    @classmethod
    def from_hf(cls, d: dict, where: str = "talker_config") -> TalkerConfig:
        theta, section, _ = rope_settings(d, 1e6, where)
        return from_dict(cls, d, where, rope_theta=theta, mrope_section=section or (16, 24, 24))


@dataclass(frozen=True)
class DiTConfig:
    """Flow-matching DiT of Token2Wav (codes → mel), block-local attention."""

    hidden_size: int = 1024
    num_hidden_layers: int = 22
    num_attention_heads: int = 16
    ff_mult: int = 2
    emb_dim: int = 512
    head_dim: int = 64
    rope_theta: float = 10000.0
    max_position_embeddings: int = 32768
    block_size: int = 24
    look_ahead_layers: tuple[int, ...] = (10,)
    look_backward_layers: tuple[int, ...] = (0, 20)
    repeats: int = 2
    num_embeds: int = 8193
    mel_dim: int = 80
    enc_emb_dim: int = 192
    enc_dim: int = 128
    enc_channels: tuple[int, ...] = (256, 256, 256, 256, 768)
    enc_kernel_sizes: tuple[int, ...] = (5, 3, 3, 3, 1)
    enc_dilations: tuple[int, ...] = (1, 2, 3, 4, 1)
    enc_attention_channels: int = 64
    enc_res2net_scale: int = 2
    enc_se_channels: int = 64

    @classmethod
    def from_hf(cls, d: dict, where: str = "token2wav_config.dit_config") -> DiTConfig:
        theta, _, _ = rope_settings(d, 10000.0, where)
        return from_dict(cls, d, where, rope_theta=theta)


@dataclass(frozen=True)
class BigVGANConfig:
    """BigVGAN vocoder of Token2Wav (mel → 24 kHz waveform)."""

    mel_dim: int = 80
    upsample_initial_channel: int = 1536
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    upsample_rates: tuple[int, ...] = (5, 3, 2, 2, 2, 2)
    upsample_kernel_sizes: tuple[int, ...] = (11, 7, 4, 4, 4, 4)

    @classmethod
    def from_hf(cls, d: dict, where: str = "token2wav_config.bigvgan_config") -> BigVGANConfig:
        return from_dict(cls, d, where)


@dataclass(frozen=True)
class Token2WavConfig:
    dit: DiTConfig = field(default_factory=DiTConfig)
    bigvgan: BigVGANConfig = field(default_factory=BigVGANConfig)

    @classmethod
    def from_hf(cls, d: dict, where: str = "token2wav_config") -> Token2WavConfig:
        return cls(
            dit=DiTConfig.from_hf(d.get("dit_config") or {}, f"{where}.dit_config"),
            bigvgan=BigVGANConfig.from_hf(d.get("bigvgan_config") or {}, f"{where}.bigvgan_config"),
        )


@dataclass(frozen=True)
class Qwen25OmniConfig:
    thinker: ThinkerConfig
    talker: TalkerConfig | None
    token2wav: Token2WavConfig | None
    enable_audio_output: bool = True
    family: str = "qwen2_5_omni"

    @property
    def has_speech(self) -> bool:
        return self.enable_audio_output and self.talker is not None and self.token2wav is not None

    @classmethod
    def from_hf(cls, d: dict) -> Qwen25OmniConfig:
        if d.get("model_type") not in (None, "qwen2_5_omni"):
            raise ConfigError(f"model_type '{d.get('model_type')}' is not qwen2_5_omni")
        thinker = ThinkerConfig.from_hf(sub(d, "thinker_config", "config"))
        enable = field_value(d, "enable_audio_output", "config", bool, True)
        talker = TalkerConfig.from_hf(sub(d, "talker_config", "config")) if enable and d.get("talker_config") else None
        t2w = Token2WavConfig.from_hf(sub(d, "token2wav_config", "config")) if enable and d.get("token2wav_config") else None
        return cls(thinker=thinker, talker=talker, token2wav=t2w, enable_audio_output=enable)
