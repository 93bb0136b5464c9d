"""Qwen3-Omni configuration: one frozen dataclass per component, built from ``config.json``.

Field names are the checkpoint's own names (``thinker_config.text_config.num_experts`` ...). The
same ``model_type`` (``qwen3_omni_moe``) covers the Instruct checkpoint (Thinker + Talker +
Code2Wav) and the Thinking / Captioner checkpoints (Thinker only, ``enable_audio_output: false``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from thinktalk.config import ConfigError, divisible, field_value, from_dict, rope_settings, sub


def _mrope(d: dict, where: str, head_dim: int, default: tuple[int, ...]) -> tuple[float, tuple[int, ...]]:
    """(theta, mrope_section) of a Qwen3 MoE decoder; the section must cover head_dim / 2 frequencies.

    Qwen3-Omni always interleaves the three position components over the frequencies (the reference
    ignores the ``interleaved`` flag), so only the section sizes matter here.
    """
    theta, section, _ = rope_settings(d, 1e6, where)
    section = section or default
    if sum(section) * 2 != head_dim:
        raise ConfigError(f"{where}: mrope_section {list(section)} must sum to head_dim/2 = {head_dim // 2}")
    return theta, section


def _head_dim(d: dict, where: str) -> int:
    """``head_dim`` as written, or ``hidden_size // num_attention_heads`` like the reference (checked before dividing)."""
    if d.get("head_dim") is not None:
        return field_value(d, "head_dim", where)
    return field_value(d, "hidden_size", where) // field_value(d, "num_attention_heads", where)


@dataclass(frozen=True)
class MoEDecoderConfig:
    """A Qwen3-MoE decoder (QK-norm, routed experts): the Thinker's LLM and the Talker's body.

    ``shared_expert_intermediate_size`` > 0 adds a sigmoid-gated shared expert to every MoE layer
    (the Talker). ``mlp_only_layers`` / ``decoder_sparse_step`` choose which layers are MoE (Thinker).
    """

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    moe_intermediate_size: int
    num_experts: int
    num_experts_per_tok: int
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    shared_expert_intermediate_size: int = 0
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    max_position_embeddings: int = 32768
    rope_theta: float = 1e6
    mrope_section: tuple[int, ...] = (24, 20, 20)

    def is_moe_layer(self, layer: int) -> bool:
        return layer not in self.mlp_only_layers and self.num_experts > 0 and (layer + 1) % self.decoder_sparse_step == 0

    @classmethod
    def from_hf(cls, d: dict, where: str, talker: bool = False) -> MoEDecoderConfig:
        head_dim = _head_dim(d, where)
        theta, section = _mrope(d, where, head_dim, (24, 20, 20))
        # transformers 5 writes the Talker's expert count as ``num_local_experts``.
        key = "num_experts" if d.get("num_experts") is not None else "num_local_experts"
        experts = field_value(d, key, where, int) if d.get(key) is not None else None
        if experts is None:
            raise ConfigError(f"config field '{where}.num_experts' is missing")
        overrides = dict(head_dim=head_dim, rope_theta=theta, mrope_section=section, num_experts=experts)
        if talker:
            # The reference builds every Talker layer as a shared-expert MoE layer, whatever
            # mlp_only_layers / decoder_sparse_step say.
            overrides.update(mlp_only_layers=(), decoder_sparse_step=1, norm_topk_prob=bool(d.get("norm_topk_prob", False)))
            if not d.get("shared_expert_intermediate_size"):
                raise ConfigError(f"config field '{where}.shared_expert_intermediate_size' is missing")
        cfg = from_dict(cls, d, where, **overrides)
        if cfg.num_experts_per_tok > cfg.num_experts:
            raise ConfigError(f"{where}: num_experts_per_tok {cfg.num_experts_per_tok} > num_experts {cfg.num_experts}")
        return cfg


@dataclass(frozen=True)
class AudioEncoderConfig:
    """AuT: Conv2D ×8 downsampling in ``2 * n_window``-frame chunks, attention in ``n_window_infer`` windows."""

    num_mel_bins: int
    encoder_layers: int
    encoder_attention_heads: int
    encoder_ffn_dim: int
    d_model: int
    output_dim: int
    downsample_hidden_size: int = 480
    n_window: int = 50
    n_window_infer: int = 800
    conv_chunksize: int = 500
    max_source_positions: int = 1500
    activation_function: str = "gelu"

    @classmethod
    def from_hf(cls, d: dict, where: str = "thinker_config.audio_config") -> AudioEncoderConfig:
        cfg = from_dict(cls, d, where)
        divisible(where, "d_model", cfg.d_model, "encoder_attention_heads", cfg.encoder_attention_heads)
        if cfg.n_window_infer < 2 * cfg.n_window:
            raise ConfigError(f"{where}: n_window_infer ({cfg.n_window_infer}) must be >= 2 * n_window ({2 * cfg.n_window})")
        return cfg


@dataclass(frozen=True)
class VisionEncoderConfig:
    """Qwen3-VL ViT: 16×16×2 patches, learned (interpolated) + 2D rotary positions, deepstack mergers."""

    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    hidden_act: str = "gelu_pytorch_tanh"
    in_channels: int = 3
    patch_size: int = 16
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    num_position_embeddings: int = 2304
    deepstack_visual_indexes: tuple[int, ...] = (8, 16, 24)
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf(cls, d: dict, where: str = "thinker_config.vision_config") -> VisionEncoderConfig:
        theta, _, _ = rope_settings(d, 10000.0, where)
        cfg = from_dict(cls, d, where, rope_theta=theta)
        divisible(where, "hidden_size", cfg.hidden_size, "num_heads", cfg.num_heads)
        side = int(cfg.num_position_embeddings**0.5)
        if side * side != cfg.num_position_embeddings:
            raise ConfigError(f"{where}.num_position_embeddings ({cfg.num_position_embeddings}) must be a square")
        return cfg


@dataclass(frozen=True)
class ThinkerConfig:
    text: MoEDecoderConfig
    audio: AudioEncoderConfig
    vision: VisionEncoderConfig
    audio_token_id: int = 151675
    image_token_id: int = 151655
    video_token_id: int = 151656
    audio_start_token_id: int = 151669
    audio_end_token_id: int = 151670
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    position_id_per_seconds: float = 13
    user_token_id: int = 872
    tie_word_embeddings: bool = False

    @classmethod
    def from_hf(cls, d: dict, where: str = "thinker_config") -> ThinkerConfig:
        text = MoEDecoderConfig.from_hf(sub(d, "text_config", where), f"{where}.text_config")
        vision = VisionEncoderConfig.from_hf(sub(d, "vision_config", where), f"{where}.vision_config")
        if len(vision.deepstack_visual_indexes) > text.num_hidden_layers:
            raise ConfigError(f"{where}: more deepstack features than LLM layers")
        return from_dict(
            cls, d, where,
            text=text,
            audio=AudioEncoderConfig.from_hf(sub(d, "audio_config", where), f"{where}.audio_config"),
            vision=vision,
        )


@dataclass(frozen=True)
class CodePredictorConfig:
    """The MTP code predictor: a small dense Qwen3 decoder predicting codebooks 1..G-1 of a frame."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_code_groups: int = 16
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    rope_theta: float = 10000.0

    @classmethod
    def from_hf(cls, d: dict, where: str = "talker_config.code_predictor_config") -> CodePredictorConfig:
        theta, _, _ = rope_settings(d, 10000.0, where)
        head_dim = _head_dim(d, where)
        if d.get("sliding_window") is not None and any(t == "sliding_attention" for t in d.get("layer_types") or ()):
            raise ConfigError(f"{where}: sliding-window code predictor layers are not supported")
        return from_dict(cls, d, where, rope_theta=theta, head_dim=head_dim)


@dataclass(frozen=True)
class TalkerConfig:
    """The MoE Talker: reads projected Thinker states, emits codebook 0; the code predictor does the rest."""

    text: MoEDecoderConfig
    code_predictor: CodePredictorConfig
    thinker_hidden_size: int
    num_code_groups: int = 16
    accept_hidden_layer: int = 24
    codec_bos_id: int = 2149
    codec_eos_token_id: int = 2150
    codec_pad_id: int = 2148
    codec_nothink_id: int = 2155
    codec_think_bos_id: int = 2156
    codec_think_eos_id: int = 2157
    speaker_id: dict = field(default_factory=dict)
    audio_token_id: int = 151675
    image_token_id: int = 151655
    video_token_id: int = 151656
    audio_start_token_id: int = 151669
    vision_start_token_id: int = 151652
    position_id_per_seconds: float = 13
    spatial_merge_size: int = 2

    @classmethod
    def from_hf(cls, d: dict, where: str = "talker_config") -> TalkerConfig:
        text = MoEDecoderConfig.from_hf(sub(d, "text_config", where), f"{where}.text_config", talker=True)
        cp = CodePredictorConfig.from_hf(sub(d, "code_predictor_config", where), f"{where}.code_predictor_config")
        cfg = from_dict(cls, d, where, text=text, code_predictor=cp, speaker_id=dict(d.get("speaker_id") or {}))
        if cp.num_code_groups != cfg.num_code_groups:
            raise ConfigError(
                f"{where}: num_code_groups {cfg.num_code_groups} != code_predictor_config.num_code_groups {cp.num_code_groups}"
            )
        return cfg


@dataclass(frozen=True)
class Code2WavConfig:
    """Causal ConvNet vocoder: code embeddings → sliding-window transformer → upsampling → 24 kHz."""

    codebook_size: int = 2048
    num_quantizers: int = 16
    hidden_size: int = 1024
    intermediate_size: int = 3072
    num_hidden_layers: int = 8
    num_attention_heads: int = 16
    num_key_value_heads: int = 16
    sliding_window: int = 72
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-5
    attention_bias: bool = False
    rope_theta: float = 10000.0
    upsample_rates: tuple[int, ...] = (8, 5, 4, 3)
    upsampling_ratios: tuple[int, ...] = (2, 2)
    decoder_dim: int = 1536
    sample_rate: int = 24000

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def samples_per_frame(self) -> int:
        n = 1
        for r in (*self.upsampling_ratios, *self.upsample_rates):
            n *= r
        return n

    @classmethod
    def from_hf(cls, d: dict, where: str = "code2wav_config") -> Code2WavConfig:
        theta, _, _ = rope_settings(d, 10000.0, where)
        return from_dict(cls, d, where, rope_theta=theta)


@dataclass(frozen=True)
class Qwen3OmniConfig:
    thinker: ThinkerConfig
    talker: TalkerConfig | None
    code2wav: Code2WavConfig | None
    enable_audio_output: bool = True
    im_start_token_id: int = 151644
    im_end_token_id: int = 151645
    system_token_id: int = 8948
    user_token_id: int = 872
    assistant_token_id: int = 77091
    tts_pad_token_id: int = 151671
    tts_bos_token_id: int = 151672
    tts_eos_token_id: int = 151673
    family: str = "qwen3_omni_moe"

    @property
    def has_speech(self) -> bool:
        return self.enable_audio_output and self.talker is not None and self.code2wav is not None

    @classmethod
    def from_hf(cls, d: dict) -> Qwen3OmniConfig:
        if d.get("model_type") not in (None, "qwen3_omni_moe"):
            raise ConfigError(f"model_type '{d.get('model_type')}' is not qwen3_omni_moe")
        thinker = ThinkerConfig.from_hf(sub(d, "thinker_config", "config"))
        enable = field_value(d, "enable_audio_output", "config", bool, True)
        talker = TalkerConfig.from_hf(sub(d, "talker_config", "config")) if enable and d.get("talker_config") else None
        c2w = Code2WavConfig.from_hf(sub(d, "code2wav_config", "config")) if enable and d.get("code2wav_config") else None
        if talker is not None:
            if talker.thinker_hidden_size != thinker.text.hidden_size:
                raise ConfigError(
                    f"talker_config.thinker_hidden_size {talker.thinker_hidden_size} != thinker hidden size {thinker.text.hidden_size}"
                )
            if not 0 <= talker.accept_hidden_layer <= thinker.text.num_hidden_layers:
                raise ConfigError(f"talker_config.accept_hidden_layer {talker.accept_hidden_layer} is not a Thinker layer")
        if talker is not None and c2w is not None and c2w.num_quantizers != talker.num_code_groups:
            raise ConfigError(
                f"code2wav_config.num_quantizers {c2w.num_quantizers} != talker_config.num_code_groups {talker.num_code_groups}"
            )
        return from_dict(cls, d, "config", thinker=thinker, talker=talker, code2wav=c2w, enable_audio_output=enable)
