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
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from thinktalk.generation import compiled
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


def replicate_pad(x: torch.Tensor, left: int, right: int) -> torch.Tensor:
    """``F.pad(x, (left, right), mode="replicate")``, bit for bit, as one concatenation (3-5x faster on CPUs)."""
    shape = x.shape[:-1]
    return torch.cat([x[..., :1].expand(*shape, left), x, x[..., -1:].expand(*shape, right)], dim=-1)


class SnakeBeta(nn.Module):
    """x + 1/β · sin²(αx), per channel, with α = exp(alpha) and β = exp(beta) (log-scale parameters)."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha.exp()[None, :, None]
        beta = self.beta.exp()[None, :, None]
        return torch.addcmul(x, torch.sin(x * alpha).square_(), 1.0 / (beta + 1e-9))


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
        x = replicate_pad(x, pad, pad)
        w = self.filter.to(x.dtype).expand(c, 1, -1)
        x = AA_RATIO * F.conv_transpose1d(x, w, stride=AA_RATIO, groups=c)
        return x[..., crop_left:-crop_right]

    def downsample(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        left = AA_KERNEL // 2 - (1 if AA_KERNEL % 2 == 0 else 0)
        x = replicate_pad(x, left, AA_KERNEL // 2)
        return F.conv1d(x, self.filter.to(x.dtype).expand(c, 1, -1), stride=AA_RATIO, groups=c)

    def fused(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` written as shifted, weighted copies of the signal, never interleaving it: the ×2
        interpolation as its two polyphase halves (6 taps each), the activation on each half, the decimation as 6
        taps on each half. Eager this is slower than the convolutions; compiled (:func:`thinktalk.compile_speech`
        registers it), inductor makes the whole activation a few loops over the signal instead of two
        convolutions and a dozen passes over a signal twice as long. Equal to float rounding.

        With pad = 5 replicated samples each side and the reference's crop of 15 transposed-conv outputs, output
        2q of the interpolation reads inputs q+2 .. q+7 (odd taps, reversed) and 2q + 1 inputs q+3 .. q+8 (even
        taps). The decimation's output q reads the interpolated samples 2q - 5 .. 2q + 6 (replicate-padded):
        the even ones q-2 .. q+3 through the odd taps, the odd ones q-3 .. q+2 through the even taps; past the
        edges both halves read the first (even) and the last (odd) sample."""
        half = AA_KERNEL // AA_RATIO  # taps per phase
        pad = half - 1
        first = (pad * AA_RATIO + (AA_KERNEL - AA_RATIO) // 2 - 1) // 2  # 7: the newest input of output 2q
        taps = self.filter.to(x.dtype)
        t = x.shape[-1]
        xp = replicate_pad(x, pad, pad)
        even = sum(AA_RATIO * taps[2 * i + 1] * xp[..., first - i : first - i + t] for i in range(half))
        odd = sum(AA_RATIO * taps[2 * i] * xp[..., first + 1 - i : first + 1 - i + t] for i in range(half))
        even, odd = self.act(even), self.act(odd)
        shape, head, tail = even.shape[:-1], even[..., :1], odd[..., -1:]
        even = torch.cat([head.expand(*shape, 2), even, tail.expand(*shape, 3)], dim=-1)
        odd = torch.cat([head.expand(*shape, 3), odd, tail.expand(*shape, 2)], dim=-1)
        return sum(taps[2 * i + 1] * even[..., i : i + t] + taps[2 * i] * odd[..., i : i + t] for i in range(half))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if compiled.is_compiled(self, "fused"):  # compile_speech: the fused form, compiled
            return compiled.call(self, "fused", x)
        return self.downsample(self.act(self.upsample(x)))


# Convolutions of at most this many input channels run as one matrix product per tap in the fast path on a CPU
# (with the activations compiled): oneDNN's direct convolution is slowest at the vocoder's narrow, long last stages (measured on
# a CPU, 2-4 channels x 24-48k samples: 2-4x slower than the matrix products; from 16 channels on it is as fast).
MATMUL_CONV_CHANNELS = 8


def conv1d_as_matmuls(conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` of a stride-1, zero-padded convolution [B, Ci, T] as a sum of one matrix product per tap:
    weight[:, :, k] @ (x shifted by k·dilation). Equal to the convolution to float rounding (the sums run in another
    order)."""
    (d,), (p,), w = conv.dilation, conv.padding, conv.weight
    if conv.stride != (1,) or conv.groups != 1 or conv.padding_mode != "zeros":
        raise ValueError("conv1d_as_matmuls: stride 1, one group, zero padding only")
    xp = F.pad(x, (p, p))
    t = xp.shape[-1] - d * (w.shape[-1] - 1)
    if x.shape[0] == 1:  # one signal: 2-D products accumulated in place
        xp = xp[0]
        out = w[:, :, 0] @ xp[:, :t] if conv.bias is None else torch.addmm(conv.bias[:, None], w[:, :, 0], xp[:, :t])
        for k in range(1, w.shape[-1]):
            out.addmm_(w[:, :, k], xp[:, k * d : k * d + t])
        return out[None]
    out = w[:, :, 0] @ xp[..., :t]
    for k in range(1, w.shape[-1]):
        out = out + w[:, :, k] @ xp[..., k * d : k * d + t]
    return out if conv.bias is None else out + conv.bias[:, None]


def fast_conv(conv: nn.Conv1d, x: torch.Tensor, fast: bool) -> torch.Tensor:
    """``conv(x)``; with ``fast`` (the compiled path) narrow convolutions on a CPU as matrix products."""
    if fast and conv.in_channels <= MATMUL_CONV_CHANNELS and x.device.type == "cpu":
        return conv1d_as_matmuls(conv, x)
    return conv(x)


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
        fast = compiled.is_compiled(self.activations[0], "fused")
        for i, (c1, c2) in enumerate(zip(self.convs1, self.convs2)):
            h = fast_conv(c1, self.activations[2 * i](x), fast)
            x = x + fast_conv(c2, self.activations[2 * i + 1](h), fast)
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
        return torch.clamp(self.output(x), -1.0, 1.0)[:, 0]

    def output(self, x: torch.Tensor) -> torch.Tensor:
        """activation_post, then conv_post (as matrix products in the fast path)."""
        return fast_conv(self.conv_post, self.activation_post(x), compiled.is_compiled(self.activation_post, "fused"))


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


# ---------------------------------------------------------------------------------------------------
# Incremental (streamed) vocoding: each piece of the network computes only its new outputs
# ---------------------------------------------------------------------------------------------------

# Input samples an anti-aliased activation reaches on each side: its ×2 sinc interpolation reaches
# (-3, +2.5) input samples, the decimation (taps 2o-5 .. 2o+6 at the doubled rate) another ±2.75.
ACT_REACH = 6


@dataclass(frozen=True)
class StreamUnit:
    """A piece of the vocoder run incrementally: ``fn`` maps [B, C, n] inputs to [B, C_out, n·rate] outputs,
    and an output sample m depends on inputs within ``halo`` samples of m // rate (padding included)."""

    fn: Callable[[torch.Tensor], torch.Tensor]
    rate: int
    halo: int
    out_channels: int


@dataclass
class UnitState:
    """One stream's place in one :class:`StreamUnit`: the inputs still needed, and the outputs given out."""

    buf: torch.Tensor | None = None  # [C, n]: inputs [start, start + n)
    start: int = 0
    emitted: int = 0  # output samples given out


def stream_units(bigvgan: BigVGAN) -> list[StreamUnit]:
    """The vocoder cut in pieces whose reach is small: conv_pre, one per upsampling stage (transposed conv +
    its parallel AMP blocks), the output activation + conv_post. Their composition is :meth:`BigVGAN.forward`."""
    cfg = bigvgan.cfg
    ch = cfg.upsample_initial_channel
    widest = max(
        sum(2 * ACT_REACH + (k - 1) * d // 2 + (k - 1) // 2 for d in dil)
        for k, dil in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes)
    )
    units = [StreamUnit(lambda x: bigvgan.conv_pre(log_mel_to_unit(x)), 1, 3 + 1, ch)]
    for i, (s, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes)):
        pad = (k - s) // 2
        halo = math.ceil(max((widest - pad + k - 1) / s, 1 + (widest + pad - 1) / s)) + 1

        def stage(x: torch.Tensor, i: int = i) -> torch.Tensor:
            x = bigvgan.ups[i][0](x)
            blocks = bigvgan.resblocks[i * bigvgan.num_kernels : (i + 1) * bigvgan.num_kernels]
            return sum(block(x) for block in blocks) / bigvgan.num_kernels

        units.append(StreamUnit(stage, s, halo, ch // 2 ** (i + 1)))
    units.append(
        StreamUnit(lambda x: torch.clamp(bigvgan.output(x), -1.0, 1.0), 1, 3 + ACT_REACH + 1, 1)
    )
    return units


def unit_push(unit: StreamUnit, states: list[UnitState], inputs: list[torch.Tensor | None], finals: list[bool]) -> list[torch.Tensor]:
    """Feed each stream its new inputs [C, n] (or None); return its outputs [C_out, m] that became final.

    Output m is final once the inputs up to m // rate + halo exist (all of them at the stream's end). It is
    computed from inputs [m // rate − halo, …) only, so a piece re-reads 2·halo samples and nothing more; the
    slice's own edges (zero/replicate padding) reach only outputs that are cropped away, except at the
    utterance's true start and end, where they are the offline padding. Streams whose slices differ in
    length run as one batch padded on the right (the padding reaches only outputs cropped away), except
    those at their end, which need their true right edge and run grouped by length.
    """
    rate, halo = unit.rate, unit.halo
    outs: list[torch.Tensor | None] = [None] * len(states)
    jobs = []
    for i, (st, x, final) in enumerate(zip(states, inputs, finals)):
        if x is not None and x.shape[-1]:
            st.buf = x if st.buf is None else torch.cat([st.buf, x], dim=-1)
        n = 0 if st.buf is None else st.buf.shape[-1]
        avail = st.start + n
        end = avail * rate if final else max(0, avail - halo) * rate
        if end <= st.emitted:
            continue
        lo = max(0, st.emitted // rate - halo)
        jobs.append((i, lo, avail, end, final))
    groups: dict = {}
    for job in jobs:
        groups.setdefault(("end", job[2] - job[1]) if job[4] else "open", []).append(job)
    for group in groups.values():
        length = max(avail - lo for _, lo, avail, _, _ in group)
        rows = []
        for i, lo, avail, _, _ in group:
            st = states[i]
            piece = st.buf[:, lo - st.start : avail - st.start]
            rows.append(torch.nn.functional.pad(piece, (0, length - piece.shape[-1])))
        y = unit.fn(torch.stack(rows))
        for b, (i, lo, _, end, final) in enumerate(group):
            st = states[i]
            outs[i] = y[b, :, st.emitted - lo * rate : end - lo * rate]
            st.emitted = end
            keep = max(st.start, end // rate - halo)  # the next slice's first input
            st.buf = None if final else st.buf[:, keep - st.start :]
            st.start = keep
    empty = None
    for i, o in enumerate(outs):
        if o is None:
            ref = next((x for x in inputs if x is not None), None)
            empty = empty if empty is not None else torch.zeros(unit.out_channels, 0) if ref is None else ref.new_zeros(unit.out_channels, 0)
            outs[i] = empty
    return outs


def incremental_push(bigvgan: BigVGAN, states: list[list[UnitState]], mels: list[torch.Tensor | None], finals: list[bool]) -> list[torch.Tensor]:
    """Incremental vocoding of several streams at once: new mel [mel_dim, n] per stream (or None) → the new
    audio [samples] of each. Streamed in any pieces, a stream's audio is :meth:`BigVGAN.forward` of its whole mel
    (to float rounding; tested)."""
    xs: list[torch.Tensor | None] = list(mels)
    for u, unit in enumerate(stream_units(bigvgan)):
        xs = unit_push(unit, [s[u] for s in states], xs, finals)
    return [x[0] for x in xs]
