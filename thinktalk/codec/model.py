"""The project's own trainable codec: causal conv encoder → residual VQ → Qwen3-Omni Code2Wav decoder.

    waveform [B, 1, N] (24 kHz) ─ CodecEncoder: causal log-mel frames every 10 ms, then per stride (2, 2, 2)
      residual units + a strided causal conv, plus a linear shortcut from each frame's mel frames
      (or, ``frontend="waveform"``, strided convs (3, 4, 5, 8, 2, 2) from the samples) → z [B, T, D], T = N / 1920
    ─ ResidualVectorQuantizer (G levels of N codes, EMA codebooks) → codes [B, G, T] and q = Σ_k c_k[i_k]
    ─ output_proj (D → H, linear, only when D ≠ H) ─ Code2Wav without its code embedding → waveform

The decoder *is* :class:`thinktalk.models.qwen3_omni.code2wav.Code2Wav`. Code2Wav embeds codes as
``mean_k E[k·N + i_k]``; that is the same vector as the quantizer's ``W·Σ_k c_k[i_k]`` when
``E[k·N + i] = G · W c_k[i]`` (:meth:`Codec.code_embedding`). So training feeds the decoder the
straight-through quantized vector — its forward value is exactly what the code embedding will
produce from the codes, and the encoder gets the reconstruction gradient — and export writes the
folded codebooks as ``code2wav.code_embedding.weight``: the trained decoder then *is* a Qwen3-Omni
Code2Wav checkpoint component with G codebooks of N codes.

(Feeding the code ids into the code embedding during training would be simpler, but ids carry no
gradient: the encoder would learn only from the commitment term and never from reconstruction.)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from thinktalk.codec.quantizer import QuantizerOutput, ResidualVectorQuantizer
from thinktalk.config import ConfigError, from_dict
from thinktalk.models.qwen3_omni.code2wav import Code2Wav, ResidualUnit, full_precision_convs
from thinktalk.models.qwen3_omni.config import Code2WavConfig
from thinktalk.processing.audio import mel_filter_bank

MODEL_TYPE = "thinktalk_codec"


@dataclass(frozen=True)
class CodecEncoderConfig:
    """``frontend="mel"`` (default): causal log-mel frames every ``frontend_hop`` samples, then strided causal
    convs down to the frame rate; ``"waveform"``: strided causal convs from the samples (SEANet-style)."""

    frontend: str = "mel"
    frontend_hop: int = 240  # 10 ms at 24 kHz
    frontend_window: int = 960  # each mel frame sees the last 40 ms
    frontend_mels: int = 80
    channels: int = 32  # after the first conv; doubled by every strided conv up to max_channels
    max_channels: int = 512
    strides: tuple[int, ...] | None = None  # None: mel → factors of samples_per_frame / hop (2, 2, 2);
    #                                          waveform → the decoder's rates reversed (3, 4, 5, 8, 2, 2)
    kernel_size: int = 7
    residual_dilations: tuple[int, ...] = (1, 3)
    last_kernel_size: int = 3


@dataclass(frozen=True)
class QuantizerConfig:
    codebook_dim: int | None = None  # None: the decoder's hidden_size (no projection)
    ema_decay: float = 0.99
    epsilon: float = 1e-5
    kmeans_iters: int = 10
    dead_code_threshold: float = 0.1  # restart a code whose EMA count is under this × the mean count


@dataclass(frozen=True)
class CodecConfig:
    """The codec: ``decoder`` is a Qwen3-Omni ``code2wav_config`` (its num_quantizers and codebook_size
    are the codec's G and N)."""

    decoder: Code2WavConfig = field(default_factory=Code2WavConfig)
    encoder: CodecEncoderConfig = field(default_factory=CodecEncoderConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)

    @property
    def num_quantizers(self) -> int:
        return self.decoder.num_quantizers

    @property
    def codebook_size(self) -> int:
        return self.decoder.codebook_size

    @property
    def codebook_dim(self) -> int:
        return self.quantizer.codebook_dim or self.decoder.hidden_size

    @property
    def samples_per_frame(self) -> int:
        return self.decoder.samples_per_frame

    @property
    def sample_rate(self) -> int:
        return self.decoder.sample_rate

    @property
    def encoder_strides(self) -> tuple[int, ...]:
        if self.encoder.strides is not None:
            return self.encoder.strides
        if self.encoder.frontend == "mel":
            return prime_factors(max(1, self.samples_per_frame // self.encoder.frontend_hop))
        return tuple(reversed(self.decoder.upsample_rates)) + tuple(reversed(self.decoder.upsampling_ratios))

    def validate(self, where: str = "codec") -> CodecConfig:
        enc = self.encoder
        if enc.frontend not in ("mel", "waveform"):
            raise ConfigError(f"{where}.encoder.frontend must be 'mel' or 'waveform' (got '{enc.frontend}')")
        hop = enc.frontend_hop if enc.frontend == "mel" else 1
        if enc.frontend == "mel" and not (0 < hop <= enc.frontend_window):
            raise ConfigError(f"{where}.encoder: frontend_hop must be in (0, frontend_window]")
        if hop * math.prod(self.encoder_strides) != self.samples_per_frame:
            what = f"frontend_hop {hop} × strides" if enc.frontend == "mel" else "strides"
            raise ConfigError(
                f"{where}.encoder.{what} {list(self.encoder_strides)} downsample by {hop * math.prod(self.encoder_strides)}, "
                f"but the decoder makes {self.samples_per_frame} samples per frame"
            )
        if self.decoder.hidden_size % self.decoder.num_attention_heads:
            raise ConfigError(f"{where}.decoder.hidden_size must be a multiple of num_attention_heads")
        if self.decoder.decoder_dim % 2 ** len(self.decoder.upsample_rates):
            raise ConfigError(f"{where}.decoder.decoder_dim must be divisible by 2^len(upsample_rates)")
        return self

    # -- (de)serialisation: config.json of a codec directory ----------------------------------------
    def to_dict(self) -> dict:
        return {
            "model_type": MODEL_TYPE,
            "encoder": dataclasses.asdict(self.encoder),
            "quantizer": dataclasses.asdict(self.quantizer),
            "code2wav_config": code2wav_hf_dict(self.decoder),
        }

    @classmethod
    def from_dict(cls, d: dict, where: str = "codec") -> CodecConfig:
        """From a codec ``config.json`` / YAML dict: ``code2wav_config`` (HF spelling; ``decoder`` is accepted
        too), ``encoder``, ``quantizer``. Unknown keys are errors naming them."""
        d = dict(d)
        d.pop("model_type", None)
        dec = d.pop("code2wav_config", None)
        if dec is None:
            dec = d.pop("decoder", None)
        enc = d.pop("encoder", None) or {}
        qua = d.pop("quantizer", None) or {}
        if d:
            raise ConfigError(f"{where}: unknown keys {sorted(d)} (known: code2wav_config, encoder, quantizer)")
        for name, sub, kind in (("encoder", enc, CodecEncoderConfig), ("quantizer", qua, QuantizerConfig)):
            unknown = set(sub) - {f.name for f in dataclasses.fields(kind)}
            if unknown:
                raise ConfigError(f"{where}.{name}: unknown keys {sorted(unknown)}")
        decoder = Code2WavConfig.from_hf(dec or {}, where=f"{where}.code2wav_config")
        unknown = set(dec or {}) - {f.name for f in dataclasses.fields(Code2WavConfig)} - set(_HF_ONLY_KEYS)
        if unknown:
            raise ConfigError(f"{where}.code2wav_config: unknown keys {sorted(unknown)}")
        return cls(
            decoder=decoder,
            encoder=from_dict(CodecEncoderConfig, enc, f"{where}.encoder"),
            quantizer=from_dict(QuantizerConfig, qua, f"{where}.quantizer"),
        ).validate(where)


# Keys of the reference's code2wav_config that thinktalk's Code2WavConfig does not model (or spells differently).
_HF_ONLY_KEYS = ("rope_parameters", "rope_theta", "rope_scaling", "max_position_embeddings", "layer_scale_initial_scale",
                 "attention_dropout", "initializer_range", "model_type", "dtype", "torch_dtype")


def code2wav_hf_dict(cfg: Code2WavConfig) -> dict:
    """The ``code2wav_config`` of a Qwen3-Omni ``config.json`` (the reference's spelling) for ``cfg``."""
    if cfg.sample_rate != 24000:
        raise ConfigError(f"Qwen3-Omni Code2Wav is 24 kHz; this decoder is configured for {cfg.sample_rate} Hz")
    return {
        "codebook_size": cfg.codebook_size,
        "num_quantizers": cfg.num_quantizers,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "sliding_window": cfg.sliding_window,
        "hidden_act": cfg.hidden_act,
        "rms_norm_eps": cfg.rms_norm_eps,
        "attention_bias": cfg.attention_bias,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "upsample_rates": list(cfg.upsample_rates),
        "upsampling_ratios": list(cfg.upsampling_ratios),
        "decoder_dim": cfg.decoder_dim,
    }


def prime_factors(n: int) -> tuple[int, ...]:
    """Ascending prime factors: prime_factors(8) = (2, 2, 2), prime_factors(1920) = (2, 2, 2, 2, 2, 2, 2, 3, 5)."""
    out, p = [], 2
    while n > 1:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    return tuple(out)


class CausalMelFrontend(nn.Module):
    """Log-mel frames of the last ``window`` samples every ``hop`` samples: [B, 1, N] → [B, mels, N / hop].

    Frame m covers samples [(m+1)·hop - window, (m+1)·hop) (zeros before the start), so it never looks ahead."""

    def __init__(self, sample_rate: int, hop: int, window: int, mels: int):
        super().__init__()
        self.hop, self.window = hop, window
        self.register_buffer("hann", torch.hann_window(window), persistent=False)
        fb = mel_filter_bank(window // 2 + 1, mels, 0.0, sample_rate / 2, sample_rate)
        self.register_buffer("mel", fb.t().contiguous(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x[:, 0], (self.window - self.hop, 0))
        spec = torch.stft(x, self.window, self.hop, window=self.hann, center=False, return_complex=True).abs()
        return torch.log10((self.mel @ spec).clamp_min(1e-5)) + 2.5  # roughly centred for speech at -20 dBFS


class CausalConv1d(nn.Module):
    """Conv1d padded on the left by ``(kernel-1)·dilation + 1 - stride``: output frame t sees inputs up to
    ``(t+1)·stride - 1``. Input lengths must be multiples of the stride (the codec pads whole frames)."""

    def __init__(self, dim_in: int, dim_out: int, kernel: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        self.conv = nn.Conv1d(dim_in, dim_out, kernel, stride, dilation=dilation)
        self.left = (kernel - 1) * dilation + 1 - stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (self.left, 0)))


class EncoderResidualUnit(nn.Module):
    def __init__(self, dim: int, kernel: int, dilation: int):
        super().__init__()
        self.conv1 = CausalConv1d(dim, max(1, dim // 2), kernel, dilation=dilation)
        self.conv2 = CausalConv1d(max(1, dim // 2), dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.elu(self.conv1(F.elu(x))))


class CodecEncoder(nn.Module):
    """Causal encoder: [B, 1, N] → [B, T, D], T = N / samples_per_frame, each frame RMS-normalised.

    ``frontend="mel"``: :class:`CausalMelFrontend` then strided causal convs from the mel frame rate;
    ``"waveform"``: strided causal convs from the samples. Measured here (docs/codec.md): at the widths two
    CPU cores can train, the waveform encoder collapses within ~100 steps — its latents stop depending on
    the audio, and the decoder learns an input-independent average spectrum — while the mel front-end
    hands the decoder the spectral envelope from the first step and its codes carry the speech.

    The normalisation fixes the latents' scale: Code2Wav RMS-normalises its input inside every transformer
    layer, so without it the encoder could shrink z (and with it the commitment loss) at no cost until
    the codes carry nothing."""

    def __init__(self, cfg: CodecEncoderConfig, strides: tuple[int, ...], dim_out: int, sample_rate: int = 24000):
        super().__init__()
        self.frontend = None
        dim_in = 1
        if cfg.frontend == "mel":
            self.frontend = CausalMelFrontend(sample_rate, cfg.frontend_hop, cfg.frontend_window, cfg.frontend_mels)
            dim_in = cfg.frontend_mels
        self.stride = math.prod(strides) * (cfg.frontend_hop if self.frontend is not None else 1)
        self.conv_in = CausalConv1d(dim_in, cfg.channels, cfg.kernel_size)
        blocks, dim = [], cfg.channels
        for s in strides:
            nxt = min(2 * dim, cfg.max_channels)
            blocks.append(nn.ModuleDict({
                "residual": nn.Sequential(*(EncoderResidualUnit(dim, cfg.kernel_size, d) for d in cfg.residual_dilations)),
                "down": CausalConv1d(dim, nxt, 2 * s, stride=s),
            }))
            dim = nxt
        self.blocks = nn.ModuleList(blocks)
        self.conv_out = CausalConv1d(dim, dim_out, cfg.last_kernel_size)
        # mel front-end: a linear map of each code frame's own mel frames, added to the conv stack's output
        # (without it the deep stack's latents collapse as the waveform encoder's do; see the class docstring)
        self.shortcut = None
        if self.frontend is not None:
            r = math.prod(strides)
            self.shortcut = nn.Conv1d(cfg.frontend_mels, dim_out, r, stride=r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % self.stride:
            raise ValueError(f"encoder input length {x.shape[-1]} is not a multiple of {self.stride} samples per frame")
        feats = self.frontend(x) if self.frontend is not None else x
        x = self.conv_in(feats)
        for block in self.blocks:
            x = block["down"](F.elu(block["residual"](x)))
        z = self.conv_out(F.elu(x))
        if self.shortcut is not None:
            z = z + self.shortcut(feats)
        z = z.transpose(1, 2)
        return z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + 1e-6)


@dataclass
class CodecOutput:
    audio: torch.Tensor  # [B, 1, code2wav.num_samples(T)] decoded from the quantized latents
    codes: torch.Tensor  # [B, G, T]
    quantizer: QuantizerOutput


def code2wav_from_embeddings(code2wav: Code2Wav, x: torch.Tensor) -> torch.Tensor:
    """Code2Wav after its code embedding: x [B, T, H] (what ``code_embedding(codes + offset).mean(1)`` gives)
    → waveform [B, 1, samples]. The same submodules in the same order as ``Code2Wav.forward``; the tests
    check that both give the same waveform for the same codes."""
    with full_precision_convs(x.device):
        h, _ = code2wav.pre_transformer(x)
        h = h.transpose(1, 2)
        for blocks in code2wav.upsample:
            for m in blocks:
                h = m(h)
        for m in code2wav.decoder:
            h = m(h)
    return h.clamp(-1, 1)


class Codec(nn.Module):
    def __init__(self, cfg: CodecConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        q = cfg.quantizer
        self.encoder = CodecEncoder(cfg.encoder, cfg.encoder_strides, cfg.codebook_dim, cfg.sample_rate)
        self.quantizer = ResidualVectorQuantizer(cfg.codebook_dim, cfg.num_quantizers, cfg.codebook_size, q.ema_decay,
                                                 q.epsilon, q.kmeans_iters, q.dead_code_threshold)
        self.output_proj = None
        if cfg.codebook_dim != cfg.decoder.hidden_size:
            self.output_proj = nn.Linear(cfg.codebook_dim, cfg.decoder.hidden_size, bias=False)
        self.code2wav = Code2Wav(cfg.decoder)
        # The code embedding is derived from the codebooks (sync_code_embedding), never trained by gradient.
        self.code2wav.code_embedding.weight.requires_grad_(False)

    @property
    def samples_per_frame(self) -> int:
        return self.cfg.samples_per_frame

    @torch.no_grad()
    def init_for_training(self) -> None:
        """Variance-preserving convolutions (weights N(0, 1/fan-in), zero biases) and a small last decoder conv.

        PyTorch's default conv init shrinks the signal by about 1/√3 per layer, and for a transposed
        convolution it computes the fan-in from the *output* channels: through Code2Wav's ×8 ×5 ×4 ×3
        stack the input-dependent part of the waveform falls to ~2 % of the bias and SnakeBeta terms
        (and the default waveform sits on the final clamp, where no gradient passes). The decoder then
        learns an input-independent average and the encoder collapses. Here a transposed conv's fan-in
        is what one output sample sees (in_channels · kernel / stride), and the last conv is scaled so the
        first waveforms are quiet, inside [-1, 1]; residual branches start at a tenth."""
        for m in self.modules():
            if isinstance(m, nn.ConvTranspose1d):
                fan_in = m.in_channels * m.kernel_size[0] / m.stride[0]
            elif isinstance(m, nn.Conv1d):
                fan_in = m.in_channels // m.groups * m.kernel_size[0]
            else:
                continue
            m.weight.normal_(0.0, fan_in**-0.5)
            if m.bias is not None:
                m.bias.zero_()
        for m in self.modules():  # residual branches start small, so the stack of units does not grow the signal
            if isinstance(m, ResidualUnit):
                m.conv2.conv.weight.mul_(0.1)
            elif isinstance(m, EncoderResidualUnit):
                m.conv2.conv.weight.mul_(0.1)
        self.code2wav.decoder[-1].conv.weight.mul_(0.1)

    def pad_to_frames(self, waveform: torch.Tensor) -> torch.Tensor:
        """Zeros on the right up to whole frames (ceil(N / samples_per_frame) frames)."""
        return F.pad(waveform, (0, (-waveform.shape[-1]) % self.samples_per_frame))

    def _latents(self, waveform: torch.Tensor) -> torch.Tensor:
        if waveform.dim() == 2:
            waveform = waveform[:, None]
        if waveform.dim() != 3 or waveform.shape[1] != 1:
            raise ValueError(f"expected a mono waveform [B, 1, samples], got {tuple(waveform.shape)}")
        return self.encoder(waveform)

    def project(self, q: torch.Tensor) -> torch.Tensor:
        return self.output_proj(q) if self.output_proj is not None else q

    def forward(self, waveform: torch.Tensor) -> CodecOutput:
        """waveform [B, 1, N] (N a multiple of samples_per_frame) → reconstruction, codes, quantizer losses.

        In training mode the quantizer updates its codebooks (EMA, k-means init, dead-code restarts)."""
        qo = self.quantizer(self._latents(waveform))
        audio = code2wav_from_embeddings(self.code2wav, self.project(qo.quantized))
        return CodecOutput(audio=audio, codes=qo.codes, quantizer=qo)

    @torch.no_grad()
    def encode(self, waveform: torch.Tensor) -> torch.Tensor:
        """waveform [B, 1, N] or [B, N] → codes [B, G, ceil(N / samples_per_frame)] (right edge zero-padded)."""
        return self.quantizer.encode(self._latents(self.pad_to_frames(waveform)))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, G, T] → waveform [B, 1, samples] through the codebooks (always current, even mid-training)."""
        return code2wav_from_embeddings(self.code2wav, self.project(self.quantizer.embed(codes)))

    @torch.no_grad()
    def code_embedding(self) -> torch.Tensor:
        """Code2Wav's ``code_embedding.weight`` [G·N, H] equivalent to the codebooks: row k·N + i = G · W c_k[i]."""
        rows = torch.cat([level.embed for level in self.quantizer.levels])
        return self.project(rows) * self.cfg.num_quantizers

    @torch.no_grad()
    def sync_code_embedding(self) -> None:
        """Write the codebooks into Code2Wav's code embedding, so ``self.code2wav(codes)`` decodes on its own."""
        self.code2wav.code_embedding.weight.copy_(self.code_embedding())

    def code2wav_state_dict(self) -> dict[str, torch.Tensor]:
        """The decoder's tensors under Qwen3-Omni checkpoint names (``code2wav.*``), code embedding synced."""
        self.sync_code_embedding()
        return {f"code2wav.{k}": v.detach().clone().contiguous().cpu() for k, v in self.code2wav.state_dict().items()}
