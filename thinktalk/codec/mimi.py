"""Mimi's encoder: 24 kHz audio → residual codebook ids at 12.5 Hz (Qwen3-Omni Talker codes).

Qwen3-Omni's official codec encoder is not released, but its 16-codebook 12.5 Hz codes are reported
(Qwen2.5-Omni issue #219, DuplexOmni; Qwen3-TTS-Tokenizer-12Hz) to be the first 16 residual levels of
Kyutai's Mimi codec. This module is Mimi's encoder half, read from a checkpoint in the transformers
layout (``config.json`` + ``model.safetensors`` as ``transformers.MimiModel.save_pretrained`` writes
it, e.g. ``kyutai/mimi``):

    waveform [B, C, N] ─ SEANet conv encoder (causal convs, residual blocks, ×4 ×5 ×6 ×8 strides)
      → [B, 512, N/960] (25 Hz) ─ encoder transformer (causal, sliding window, LayerNorm, layer scale)
      → downsample conv (×2, replicate padding) → latents [B, 512, N/1920] (12.5 Hz)
      ─ split RVQ: level 0 from the *semantic* quantizer; levels 1.. from the *acoustic* residual
        quantizer, which starts again from the same latents (not from the semantic residual)
      → codes [B, K, frames]

Only what encoding needs is loaded: the decoder half and the quantizers' output projections are
skipped, and of the acoustic levels only the first ``num_quantizers - 1``. Every convolution pads
on the left (causal) and on the right only up to a whole stride, so ``N`` samples give
``ceil(N / 1920)`` frames (:func:`frames_for_samples`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from thinktalk.checkpoint import Checkpoint, WeightMap, load_weights
from thinktalk.config import ConfigError, from_dict, read_config, rope_settings
from thinktalk.nn.attention import attention
from thinktalk.nn.mlp import activation
from thinktalk.nn.rotary import apply_rotary, inv_freq, rotary_cos_sin

QWEN3_CODEBOOKS = 16  # Qwen3-Omni Talker code groups (codebook 0 by the Talker, 1..15 by the code predictor)
QWEN3_FRAME_RATE = 12.5


@dataclass(frozen=True)
class MimiConfig:
    """The fields of a Mimi ``config.json`` that the encoder uses (defaults: ``kyutai/mimi``)."""

    sampling_rate: int = 24000
    audio_channels: int = 1
    hidden_size: int = 512
    num_filters: int = 64
    num_residual_layers: int = 1
    upsampling_ratios: tuple[int, ...] = (8, 6, 5, 4)
    kernel_size: int = 7
    last_kernel_size: int = 3
    residual_kernel_size: int = 3
    dilation_growth_rate: int = 2
    use_causal_conv: bool = True
    pad_mode: str = "constant"
    compress: int = 2
    use_conv_shortcut: bool = False
    codebook_size: int = 2048
    codebook_dim: int = 256
    num_quantizers: int = 32
    num_semantic_quantizers: int = 1
    vector_quantization_hidden_dimension: int = 256
    num_hidden_layers: int = 8
    intermediate_size: int = 2048
    num_attention_heads: int = 8
    num_key_value_heads: int = 8
    head_dim: int | None = None
    hidden_act: str = "gelu"
    norm_eps: float = 1e-5
    attention_bias: bool = False
    sliding_window: int = 250
    rope_theta: float = 10000.0
    frame_rate: float | None = None  # legacy configs write it; otherwise derived from the strides

    @property
    def attention_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def encoder_frame_rate(self) -> int:
        """Frame rate after the SEANet encoder (25 Hz for kyutai/mimi), rounded up like the reference."""
        return math.ceil(self.sampling_rate / math.prod(self.upsampling_ratios))

    @property
    def latent_stride(self) -> int:
        """Stride of the downsampling conv after the transformer (1 = no such conv)."""
        rate = self.frame_rate or self.sampling_rate / (math.prod(self.upsampling_ratios) * 2)
        return int(self.encoder_frame_rate / rate)

    @property
    def samples_per_frame(self) -> int:
        return math.prod(self.upsampling_ratios) * self.latent_stride

    @property
    def codes_frame_rate(self) -> float:
        return self.sampling_rate / self.samples_per_frame

    @classmethod
    def from_hf(cls, d: dict, where: str = "config") -> MimiConfig:
        if d.get("model_type") not in (None, "mimi"):
            raise ConfigError(f"{where}: model_type '{d.get('model_type')}' is not a Mimi codec ('mimi')")
        theta, _, _ = rope_settings(d, 10000.0)
        cfg = from_dict(cls, d, where, rope_theta=theta, frame_rate=d.get("frame_rate", d.get("_frame_rate")))
        if not cfg.use_causal_conv:
            raise ConfigError(f"{where}.use_causal_conv is false: only causal Mimi encoders are supported")
        if cfg.pad_mode not in ("constant", "replicate"):
            raise ConfigError(f"{where}.pad_mode '{cfg.pad_mode}' is not supported (constant or replicate)")
        if not 1 <= cfg.num_semantic_quantizers < cfg.num_quantizers:
            raise ConfigError(f"{where}: num_semantic_quantizers must be in [1, num_quantizers)")
        return cfg


def frames_for_samples(num_samples: int, samples_per_frame: int = 1920) -> int:
    """Code frames Mimi gives for ``num_samples`` samples: every strided conv pads the right edge up to a
    whole stride, so a partial last frame still counts. Example: 24000 samples (1 s) → 13 frames."""
    return -(-num_samples // samples_per_frame)


class MimiConv1d(nn.Module):
    """Causal Conv1d: pad ``(kernel-1)·dilation + 1 - stride`` on the left and, on the right, only what
    completes the last stride (zeros, or copies of the edge sample for ``pad_mode="replicate"``)."""

    def __init__(self, dim_in: int, dim_out: int, kernel: int, stride: int = 1, dilation: int = 1,
                 bias: bool = True, pad_mode: str = "constant"):
        super().__init__()
        self.conv = nn.Conv1d(dim_in, dim_out, kernel, stride, dilation=dilation, bias=bias)
        self.stride, self.pad_mode = stride, pad_mode
        self.left = (kernel - 1) * dilation + 1 - stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        right = (-x.shape[-1]) % self.stride
        return self.conv(F.pad(x, (self.left, right), mode=self.pad_mode))


class MimiResnetBlock(nn.Module):
    """SEANet residual block: x + conv1x1(ELU(conv_k(ELU(x)))) with the hidden width divided by ``compress``."""

    def __init__(self, cfg: MimiConfig, dim: int, dilation: int):
        super().__init__()
        hidden = dim // cfg.compress
        # Module indices follow the checkpoint's names: block.1 and block.3 are the convolutions.
        self.block = nn.ModuleList([
            nn.ELU(), MimiConv1d(dim, hidden, cfg.residual_kernel_size, dilation=dilation, pad_mode=cfg.pad_mode),
            nn.ELU(), MimiConv1d(hidden, dim, 1, pad_mode=cfg.pad_mode),
        ])
        self.shortcut = MimiConv1d(dim, dim, 1, pad_mode=cfg.pad_mode) if cfg.use_conv_shortcut else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for m in self.block:
            h = m(h)
        return (self.shortcut(x) if self.shortcut is not None else x) + h


class SEANetEncoder(nn.Module):
    """conv(k7) → per ratio (4, 5, 6, 8): residual blocks, ELU, strided conv doubling the channels → ELU → conv."""

    def __init__(self, cfg: MimiConfig):
        super().__init__()
        pad = cfg.pad_mode
        layers: list[nn.Module] = [MimiConv1d(cfg.audio_channels, cfg.num_filters, cfg.kernel_size, pad_mode=pad)]
        dim = cfg.num_filters
        for ratio in reversed(cfg.upsampling_ratios):
            for j in range(cfg.num_residual_layers):
                layers.append(MimiResnetBlock(cfg, dim, cfg.dilation_growth_rate**j))
            layers += [nn.ELU(), MimiConv1d(dim, 2 * dim, 2 * ratio, stride=ratio, pad_mode=pad)]
            dim *= 2
        layers += [nn.ELU(), MimiConv1d(dim, cfg.hidden_size, cfg.last_kernel_size, pad_mode=pad)]
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for m in self.layers:
            x = m(x)
        return x


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.full((dim,), 0.01))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x


class MimiAttention(nn.Module):
    def __init__(self, cfg: MimiConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.attention_head_dim
        h, bias = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(h, self.heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(h, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(h, self.kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, h, bias=bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        out = attention(apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v, mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MimiMLP(nn.Module):
    def __init__(self, cfg: MimiConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.act = activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class MimiTransformerLayer(nn.Module):
    """Pre-LayerNorm block with layer scale on both residual branches (no final norm after the stack)."""

    def __init__(self, cfg: MimiConfig):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.self_attn = MimiAttention(cfg)
        self.self_attn_layer_scale = LayerScale(cfg.hidden_size)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.mlp = MimiMLP(cfg)
        self.mlp_layer_scale = LayerScale(cfg.hidden_size)

    def forward(self, x, cos, sin, mask):
        x = x + self.self_attn_layer_scale(self.self_attn(self.input_layernorm(x), cos, sin, mask))
        return x + self.mlp_layer_scale(self.mlp(self.post_attention_layernorm(x)))


def sliding_causal_mask(frames: int, window: int, dtype: torch.dtype, device) -> torch.Tensor:
    """Additive [T, T] mask: frame i attends to frames j with i - window < j <= i."""
    i = torch.arange(frames, device=device)[:, None]
    j = torch.arange(frames, device=device)[None, :]
    allowed = (j <= i) & (j > i - window)
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)


class MimiTransformer(nn.Module):
    def __init__(self, cfg: MimiConfig):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(MimiTransformerLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, H] (frames 0 .. T-1) → [B, T, H]."""
        t = x.shape[1]
        freq = inv_freq(self.cfg.attention_head_dim, self.cfg.rope_theta, device=x.device)
        cos, sin = rotary_cos_sin(freq, torch.arange(t, device=x.device))
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        mask = sliding_causal_mask(t, self.cfg.sliding_window, x.dtype, x.device)
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return x


class MimiCodebook(nn.Module):
    """Euclidean codebook stored as the checkpoint stores it: centroid = embed_sum / cluster_usage."""

    def __init__(self, cfg: MimiConfig, epsilon: float = 1e-5):
        super().__init__()
        self.register_buffer("embed_sum", torch.zeros(cfg.codebook_size, cfg.codebook_dim))
        self.register_buffer("cluster_usage", torch.ones(cfg.codebook_size))
        self.epsilon = epsilon

    @property
    def embed(self) -> torch.Tensor:
        return self.embed_sum / self.cluster_usage.clamp(min=self.epsilon)[:, None]

    def nearest(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., D] → index of the nearest centroid [...] (distances in float32, as the reference)."""
        flat = x.reshape(-1, x.shape[-1])
        dist = torch.cdist(flat[None].float(), self.embed[None].float(), p=2)[0]
        return dist.argmin(dim=-1).view(x.shape[:-1])


class MimiVectorQuantizer(nn.Module):
    def __init__(self, cfg: MimiConfig):
        super().__init__()
        self.codebook = MimiCodebook(cfg)


class MimiResidualQuantizer(nn.Module):
    """Residual VQ over the latents projected to the quantizer width (``input_proj``, a 1×1 conv)."""

    def __init__(self, cfg: MimiConfig, levels: int):
        super().__init__()
        self.layers = nn.ModuleList(MimiVectorQuantizer(cfg) for _ in range(levels))
        self.input_proj = None
        if cfg.vector_quantization_hidden_dimension != cfg.hidden_size:
            self.input_proj = nn.Conv1d(cfg.hidden_size, cfg.vector_quantization_hidden_dimension, 1, bias=False)

    def encode(self, latents: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
        """latents [B, H, T] → (codes [levels, B, T], projected latents [B, T, D])."""
        x = self.input_proj(latents) if self.input_proj is not None else latents
        x = x.transpose(1, 2)
        residual, codes = x, []
        for level in self.layers[:levels]:
            idx = level.codebook.nearest(residual)
            residual = residual - F.embedding(idx, level.codebook.embed)
            codes.append(idx)
        return torch.stack(codes), x


class MimiSplitQuantizer(nn.Module):
    def __init__(self, cfg: MimiConfig, num_quantizers: int):
        super().__init__()
        self.semantic_levels = cfg.num_semantic_quantizers
        self.semantic_residual_vector_quantizer = MimiResidualQuantizer(cfg, cfg.num_semantic_quantizers)
        self.acoustic_residual_vector_quantizer = MimiResidualQuantizer(cfg, num_quantizers - cfg.num_semantic_quantizers)


@dataclass
class MimiEncoding:
    """Codes and the intermediate tensors they came from (for parity checks and analysis)."""

    codes: torch.Tensor  # [B, K, frames] int64
    seanet: torch.Tensor  # [B, H, N/960] SEANet output
    transformer: torch.Tensor  # [B, H, N/960] encoder-transformer output
    latents: torch.Tensor  # [B, H, frames] after the downsampling conv
    semantic_input: torch.Tensor  # [B, frames, D] latents projected for the semantic quantizer
    acoustic_input: torch.Tensor  # [B, frames, D] latents projected for the acoustic quantizer


class MimiEncoder(nn.Module):
    """Mimi's encoder half with the first ``num_quantizers`` residual levels of its split quantizer.

    Module names are the checkpoint's (``encoder.layers.*``, ``encoder_transformer.*``,
    ``downsample.*``, ``quantizer.*``), so loading maps nothing.
    """

    def __init__(self, cfg: MimiConfig, num_quantizers: int = QWEN3_CODEBOOKS):
        super().__init__()
        if not cfg.num_semantic_quantizers <= num_quantizers <= cfg.num_quantizers:
            raise ValueError(
                f"num_quantizers {num_quantizers} must be between the semantic levels ({cfg.num_semantic_quantizers}) "
                f"and the checkpoint's num_quantizers ({cfg.num_quantizers})"
            )
        self.cfg, self.num_quantizers = cfg, num_quantizers
        self.encoder = SEANetEncoder(cfg)
        self.encoder_transformer = MimiTransformer(cfg)
        self.downsample = None
        if cfg.latent_stride > 1:
            self.downsample = MimiConv1d(cfg.hidden_size, cfg.hidden_size, 2 * cfg.latent_stride, stride=cfg.latent_stride,
                                         bias=False, pad_mode="replicate")
        self.quantizer = MimiSplitQuantizer(cfg, num_quantizers)

    @property
    def samples_per_frame(self) -> int:
        return self.cfg.samples_per_frame

    def encode_with_intermediates(self, waveform: torch.Tensor, num_quantizers: int | None = None) -> MimiEncoding:
        """waveform [B, C, N] (or [B, N] mono) at ``cfg.sampling_rate`` → :class:`MimiEncoding`."""
        n = self.num_quantizers if num_quantizers is None else num_quantizers
        if not self.cfg.num_semantic_quantizers <= n <= self.num_quantizers:
            raise ValueError(f"num_quantizers {n} is outside [{self.cfg.num_semantic_quantizers}, {self.num_quantizers}] (loaded levels)")
        if waveform.dim() == 2:
            waveform = waveform[:, None]
        if waveform.dim() != 3 or waveform.shape[1] != self.cfg.audio_channels:
            raise ValueError(f"expected a waveform [B, {self.cfg.audio_channels}, samples], got {tuple(waveform.shape)}")
        if waveform.shape[-1] == 0:
            raise ValueError("cannot encode an empty waveform")
        seanet = self.encoder(waveform)
        transformer = self.encoder_transformer(seanet.transpose(1, 2)).transpose(1, 2)
        latents = self.downsample(transformer) if self.downsample is not None else transformer
        q = self.quantizer
        semantic, sem_in = q.semantic_residual_vector_quantizer.encode(latents, q.semantic_levels)
        parts = [semantic]
        ac_in = sem_in.new_zeros(0)
        if n > q.semantic_levels:
            acoustic, ac_in = q.acoustic_residual_vector_quantizer.encode(latents, n - q.semantic_levels)
            parts.append(acoustic)
        codes = torch.cat(parts).transpose(0, 1)
        return MimiEncoding(codes, seanet, transformer, latents, sem_in, ac_in)

    def encode(self, waveform: torch.Tensor, num_quantizers: int | None = None) -> torch.Tensor:
        """waveform [B, C, N] (or [B, N]) → codes [B, K, ceil(N / samples_per_frame)] (int64)."""
        return self.encode_with_intermediates(waveform, num_quantizers).codes

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, num_quantizers: int = QWEN3_CODEBOOKS,
                        device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> MimiEncoder:
        """Load the encoder half of a Mimi checkpoint directory (transformers layout, e.g. ``kyutai/mimi``)."""
        directory = os.fspath(directory)
        cfg = MimiConfig.from_hf(read_config(directory), where=os.path.join(directory, "config.json"))
        with torch.device("meta"):
            model = cls(cfg, num_quantizers)
        unused_acoustic = "|".join(str(i) for i in range(num_quantizers - cfg.num_semantic_quantizers, cfg.num_quantizers))
        ignore = [r"\.codebook\.initialized$", r"^quantizer\.\w+_residual_vector_quantizer\.output_proj\."]
        if unused_acoustic:
            ignore.append(rf"^quantizer\.acoustic_residual_vector_quantizer\.layers\.({unused_acoustic})\.")
        load_weights(
            model,
            Checkpoint.open(directory),
            prefixes=("encoder.", "encoder_transformer.", "downsample.", "quantizer."),
            weight_map=WeightMap(ignore=tuple(ignore)),
            dtype_for=lambda name: torch.float32 if "codebook" in name else dtype,
            device=torch.device(device),
        )
        return model.eval()


def load_mimi(directory: str | os.PathLike, num_quantizers: int = QWEN3_CODEBOOKS,
              device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> MimiEncoder:
    """:meth:`MimiEncoder.from_pretrained`."""
    return MimiEncoder.from_pretrained(directory, num_quantizers, device, dtype)


def qwen3_codes(mimi: MimiEncoder, audio, sample_rate: int) -> torch.Tensor:
    """Qwen3-Omni Talker codes [16, frames] for one mono (or [channels, N]) waveform at ``sample_rate``.

    Resamples to Mimi's rate with soxr (HQ) and averages channels; frames = ceil(seconds · 12.5).
    """
    import numpy as np

    from thinktalk.processing.audio import resample, to_mono

    if mimi.num_quantizers < QWEN3_CODEBOOKS:
        raise ValueError(f"Qwen3-Omni codes need {QWEN3_CODEBOOKS} codebooks; this encoder has {mimi.num_quantizers}")
    if abs(mimi.cfg.codes_frame_rate - QWEN3_FRAME_RATE) > 1e-6:
        raise ValueError(f"this Mimi checkpoint codes at {mimi.cfg.codes_frame_rate} Hz; Qwen3-Omni codes are {QWEN3_FRAME_RATE} Hz")
    wav = np.asarray(audio.detach().cpu().numpy() if isinstance(audio, torch.Tensor) else audio, dtype=np.float32)
    wav = resample(to_mono(wav), int(sample_rate), mimi.cfg.sampling_rate)
    param = next(mimi.parameters())
    x = torch.from_numpy(wav).to(param.device, param.dtype)[None, None]
    with torch.no_grad():
        return mimi.encode(x, QWEN3_CODEBOOKS)[0]

