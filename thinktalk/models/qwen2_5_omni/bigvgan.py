"""BigVGAN vocoder of Qwen2.5-Omni's Token2Wav: log-mel (100 frames/s) → 24 kHz waveform.

conv_pre → [transposed conv ×rate → mean of AMP residual blocks] per upsampling stage → anti-aliased
SnakeBeta → conv_post → clamp to [-1, 1]. One mel frame becomes ``prod(upsample_rates)`` = 240 samples.

Every SnakeBeta runs "anti-aliased": the signal is upsampled ×2 with a Kaiser-windowed sinc filter,
the periodic non-linearity applied, then low-pass filtered and decimated ×2 — so the harmonics the
sine creates do not alias back into the band.

The network is a stack of non-causal convolutions, so an output sample depends on a bounded window of
mel frames on each side: :func:`receptive_field` computes that bound from the config. Vocoding a window
that extends at least that far beyond the samples kept gives exactly the samples of vocoding the whole
mel at once — the basis of exact chunked (streamed) vocoding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from thinktalk.models.qwen2_5_omni.config import BigVGANConfig

# Anti-aliasing filters of every activation: ratio 2 up and down, 12 taps (as the checkpoint was trained).
AA_RATIO = 2
AA_KERNEL = 12


def kaiser_sinc_filter(cutoff: float, half_width: float, kernel_size: int) -> torch.Tensor:
    """Low-pass FIR filter [kernel_size]: a sinc of ``cutoff`` (in cycles/sample) under a Kaiser window.

    The window's beta follows Kaiser's formula for the attenuation that a transition band of
    ``half_width`` allows with this many taps; the taps are normalised to sum to one (unit DC gain).
    """
    half = kernel_size // 2
    attenuation = 2.285 * (half - 1) * math.pi * (4 * half_width) + 7.95
    if attenuation > 50.0:
        beta = 0.1102 * (attenuation - 8.7)
    elif attenuation >= 21.0:
        beta = 0.5842 * (attenuation - 21) ** 0.4 + 0.07886 * (attenuation - 21.0)
    else:
        beta = 0.0
    window = torch.kaiser_window(kernel_size, beta=beta, periodic=False, dtype=torch.float32)
    if kernel_size % 2 == 0:
        t = torch.arange(-half, half) + 0.5
    else:
        t = torch.arange(kernel_size) - half
    taps = 2 * cutoff * window * torch.sinc(2 * cutoff * t)
    return taps / taps.sum()


class SnakeBeta(nn.Module):
    """x + 1/β · sin²(αx), per channel, with α = exp(alpha) and β = exp(beta) (log-scale parameters)."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha.exp()[None, :, None]
        beta = self.beta.exp()[None, :, None]
        return x + (1.0 / (beta + 1e-9)) * torch.sin(x * alpha).pow(2)


class AntiAliasedSnake(nn.Module):
    """Upsample ×2 (sinc interpolation) → SnakeBeta → low-pass + decimate ×2. Edges are replicate-padded."""

    def __init__(self, channels: int):
        super().__init__()
        self.act = SnakeBeta(channels)
        self.init_buffers()

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        # Same cutoff for both directions: half the original Nyquist band.
        taps = kaiser_sinc_filter(0.5 / AA_RATIO, 0.6 / AA_RATIO, AA_KERNEL).to(device)
        self.register_buffer("filter", taps, persistent=False)

    def upsample(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        pad = AA_KERNEL // AA_RATIO - 1
        crop_left = pad * AA_RATIO + (AA_KERNEL - AA_RATIO) // 2
        crop_right = pad * AA_RATIO + (AA_KERNEL - AA_RATIO + 1) // 2
        x = F.pad(x, (pad, pad), mode="replicate")
        w = self.filter.to(x.dtype).expand(c, 1, -1)
        x = AA_RATIO * F.conv_transpose1d(x, w, stride=AA_RATIO, groups=c)
        return x[..., crop_left:-crop_right]

    def downsample(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        left = AA_KERNEL // 2 - (1 if AA_KERNEL % 2 == 0 else 0)
        x = F.pad(x, (left, AA_KERNEL // 2), mode="replicate")
        return F.conv1d(x, self.filter.to(x.dtype).expand(c, 1, -1), stride=AA_RATIO, groups=c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsample(self.act(self.upsample(x)))


class AMPBlock(nn.Module):
    """Three residual units: act → dilated conv → act → conv, dilations (1, 3, 5) by default."""

    def __init__(self, channels: int, kernel_size: int, dilations: tuple[int, ...]):
        super().__init__()

        def conv(d: int) -> nn.Conv1d:
            return nn.Conv1d(channels, channels, kernel_size, 1, dilation=d, padding=(kernel_size * d - d) // 2)

        self.convs1 = nn.ModuleList(conv(d) for d in dilations)
        self.convs2 = nn.ModuleList(conv(1) for _ in dilations)
        self.activations = nn.ModuleList(AntiAliasedSnake(channels) for _ in range(2 * len(dilations)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, (c1, c2) in enumerate(zip(self.convs1, self.convs2)):
            x = x + c2(self.activations[2 * i + 1](c1(self.activations[2 * i](x))))
        return x


def log_mel_to_unit(mel: torch.Tensor) -> torch.Tensor:
    """The DiT's natural-log mel → the vocoder's input scale: dB (floor -115 dB, -20 dB offset) mapped to [-1, 1]."""
    amplitude = mel.exp()
    floor = torch.exp(torch.tensor(-115 / 20.0 * math.log(10), device=mel.device, dtype=mel.dtype))
    db = 20 * torch.log10(torch.clamp(amplitude, min=floor)) - 20
    return torch.clamp(2 * ((db + 115) / 115) - 1, -1, 1)


class BigVGAN(nn.Module):
    def __init__(self, cfg: BigVGANConfig):
        super().__init__()
        self.cfg = cfg
        ch = cfg.upsample_initial_channel
        self.num_kernels = len(cfg.resblock_kernel_sizes)
        self.conv_pre = nn.Conv1d(cfg.mel_dim, ch, 7, 1, padding=3)
        # ``ups.N.0``: the checkpoint nests every transposed conv in a one-element list.
        self.ups = nn.ModuleList(
            nn.ModuleList([nn.ConvTranspose1d(ch // 2**i, ch // 2 ** (i + 1), k, s, padding=(k - s) // 2)])
            for i, (s, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes))
        )
        self.resblocks = nn.ModuleList(
            AMPBlock(ch // 2 ** (i + 1), k, tuple(d))
            for i in range(len(cfg.upsample_rates))
            for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes)
        )
        out_ch = ch // 2 ** len(cfg.upsample_rates)
        self.activation_post = AntiAliasedSnake(out_ch)
        self.conv_post = nn.Conv1d(out_ch, 1, 7, 1, padding=3, bias=False)

    @property
    def hop_length(self) -> int:
        return math.prod(self.cfg.upsample_rates)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """mel [B, mel_dim, frames] (natural log) → waveform [B, frames * hop_length] in [-1, 1]."""
        x = self.conv_pre(log_mel_to_unit(mel))
        for i, up in enumerate(self.ups):
            x = up[0](x)
            blocks = self.resblocks[i * self.num_kernels : (i + 1) * self.num_kernels]
            x = sum(block(x) for block in blocks) / self.num_kernels
        x = self.conv_post(self.activation_post(x))
        return torch.clamp(x, -1.0, 1.0)[:, 0]


def receptive_field(cfg: BigVGANConfig) -> int:
    """Mel frames of context, on each side, that decide one output sample (an upper bound, at most 1 frame loose).

    Walks the network from the output back to the mel, tracking how far (left, right) an output sample
    reaches, in samples of the current stage's rate: a conv of kernel k and dilation d reaches (k-1)·d/2 each
    way; an anti-aliased activation 5 (its ×2 sinc interpolation and decimation, 12 taps each, composed);
    an AMP block its units in series, and the parallel blocks of a stage the widest of them; a transposed
    conv of stride s, kernel k and padding p maps a reach r to (r + k-1-p)/s on the left and (r + p)/s on
    the right, in input samples. One frame is added for the position of a sample inside its frame.

    >>> receptive_field(BigVGANConfig())  # the published 7B vocoder
    36

    The bound is structural: the farthest paths multiply the small outer taps of many sinc filters, so
    in float32 the outer quarter of it changes nothing measurable (the tiny test vocoder: bound 28 frames,
    visible influence 20).
    """
    act = 5
    left = right = 3.0 + act  # conv_post (k7) and activation_post, at the output rate
    widest = max(
        sum(2 * act + (k - 1) * d / 2 + (k - 1) / 2 for d in dil)
        for k, dil in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes)
    )
    for s, k in reversed(list(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes))):
        pad = (k - s) // 2
        left, right = (left + widest + k - 1 - pad) / s, (right + widest + pad) / s
    return math.ceil(max(left, right) + 3) + 1  # conv_pre (k7), then the frame itself
