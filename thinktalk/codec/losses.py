"""Codec training losses: multi-scale mel, multi-resolution STFT, and an optional adversarial term.

* :class:`MultiScaleMelLoss` — L1 between log10 mel spectrograms at several window sizes (as in DAC /
  HiFi-GAN's mel loss, several scales so both transients and pitch are seen); the filters are the
  Slaney mel filter bank thinktalk's audio processor uses.
* :class:`MultiResolutionSTFTLoss` — spectral convergence + L1 of log magnitudes at several
  (n_fft, hop, window) resolutions (Parallel WaveGAN).
* :class:`MultiScaleSTFTDiscriminator` — optional (off by default): 2-D conv nets over complex STFTs at
  several scales (EnCodec's MS-STFT discriminator), trained with hinge losses; the generator gets the
  hinge adversarial loss plus feature matching (L1 between the discriminator's activations on real and
  decoded audio, each layer normalised by the real activations' mean magnitude).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from thinktalk.processing.audio import mel_filter_bank


def _flat_pair(y: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if y.shape != x.shape:
        raise ValueError(f"decoded and target waveforms differ in shape: {tuple(y.shape)} vs {tuple(x.shape)}")
    return y.reshape(-1, y.shape[-1]), x.reshape(-1, x.shape[-1])


def _magnitude(x: torch.Tensor, n_fft: int, hop: int, win: int, window: torch.Tensor) -> torch.Tensor:
    """x [B, N] → |STFT| [B, n_fft/2 + 1, frames] (centred frames, reflect padding)."""
    spec = torch.stft(x, n_fft, hop_length=hop, win_length=win, window=window, center=True, return_complex=True)
    return spec.abs()


class MultiScaleMelLoss(nn.Module):
    def __init__(self, sample_rate: int = 24000, windows: tuple[int, ...] = (256, 512, 1024, 2048),
                 n_mels: tuple[int, ...] = (32, 64, 128, 128), clamp: float = 1e-5):
        super().__init__()
        if len(windows) != len(n_mels):
            raise ValueError("mel loss: windows and n_mels need the same length")
        self.windows, self.clamp = tuple(windows), clamp
        for w, m in zip(windows, n_mels):
            self.register_buffer(f"window_{w}", torch.hann_window(w), persistent=False)
            fb = mel_filter_bank(w // 2 + 1, m, 0.0, sample_rate / 2, sample_rate)  # [F, M]
            self.register_buffer(f"mel_{w}", fb.t().contiguous(), persistent=False)

    def forward(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """y (decoded), x (target): [B, 1, N] or [B, N]."""
        y, x = _flat_pair(y, x)
        total = y.new_zeros(())
        for w in self.windows:
            window, fb = getattr(self, f"window_{w}"), getattr(self, f"mel_{w}")
            my = fb @ _magnitude(y, w, w // 4, w, window)
            mx = fb @ _magnitude(x, w, w // 4, w, window)
            total = total + F.l1_loss(torch.log10(my.clamp_min(self.clamp)), torch.log10(mx.clamp_min(self.clamp)))
        return total / len(self.windows)


class MultiResolutionSTFTLoss(nn.Module):
    def __init__(self, resolutions: tuple[tuple[int, int, int], ...] = ((512, 128, 512), (1024, 256, 1024), (2048, 512, 2048)),
                 clamp: float = 1e-7):
        super().__init__()
        self.resolutions, self.clamp = tuple(tuple(r) for r in resolutions), clamp
        for i, (_, _, win) in enumerate(self.resolutions):
            self.register_buffer(f"window_{i}", torch.hann_window(win), persistent=False)

    def forward(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        y, x = _flat_pair(y, x)
        total = y.new_zeros(())
        for i, (n_fft, hop, win) in enumerate(self.resolutions):
            window = getattr(self, f"window_{i}")
            sy = _magnitude(y, n_fft, hop, win, window).clamp_min(self.clamp)
            sx = _magnitude(x, n_fft, hop, win, window).clamp_min(self.clamp)
            convergence = torch.linalg.vector_norm(sx - sy) / torch.linalg.vector_norm(sx).clamp_min(self.clamp)
            total = total + convergence + F.l1_loss(torch.log(sy), torch.log(sx))
        return total / len(self.resolutions)


class STFTDiscriminator(nn.Module):
    """One scale: complex STFT (real, imag as 2 channels) → 2-D convs dilated along time → 1-channel logits."""

    def __init__(self, n_fft: int, channels: int = 16, dilations: tuple[int, ...] = (1, 2, 4)):
        super().__init__()
        self.n_fft, self.hop = n_fft, n_fft // 4
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        wn = nn.utils.parametrizations.weight_norm
        convs = [wn(nn.Conv2d(2, channels, (3, 9), padding=(1, 4)))]
        for d in dilations:
            convs.append(wn(nn.Conv2d(channels, channels, (3, 9), stride=(2, 1), dilation=(1, d), padding=(1, 4 * d))))
        convs.append(wn(nn.Conv2d(channels, channels, (3, 3), padding=(1, 1))))
        self.convs = nn.ModuleList(convs)
        self.conv_post = wn(nn.Conv2d(channels, 1, (3, 3), padding=(1, 1)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        spec = torch.stft(x.reshape(-1, x.shape[-1]), self.n_fft, self.hop, window=self.window, return_complex=True)
        h = torch.stack([spec.real, spec.imag], dim=1)  # [B, 2, F, frames]
        features = []
        for conv in self.convs:
            h = F.leaky_relu(conv(h), 0.2)
            features.append(h)
        return self.conv_post(h), features


class MultiScaleSTFTDiscriminator(nn.Module):
    def __init__(self, n_ffts: tuple[int, ...] = (2048, 1024, 512), channels: int = 16):
        super().__init__()
        self.discriminators = nn.ModuleList(STFTDiscriminator(n, channels) for n in n_ffts)

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
        outs = [d(x) for d in self.discriminators]
        return [o[0] for o in outs], [o[1] for o in outs]


def discriminator_hinge_loss(real_logits: list[torch.Tensor], fake_logits: list[torch.Tensor]) -> torch.Tensor:
    loss = sum(F.relu(1 - r).mean() + F.relu(1 + f).mean() for r, f in zip(real_logits, fake_logits))
    return loss / len(real_logits)


def generator_hinge_loss(fake_logits: list[torch.Tensor]) -> torch.Tensor:
    return sum(F.relu(1 - f).mean() for f in fake_logits) / len(fake_logits)


def feature_matching_loss(real_features: list[list[torch.Tensor]], fake_features: list[list[torch.Tensor]]) -> torch.Tensor:
    total, n = 0.0, 0
    for real_scale, fake_scale in zip(real_features, fake_features):
        for r, f in zip(real_scale, fake_scale):
            total = total + F.l1_loss(f, r.detach()) / r.detach().abs().mean().clamp_min(1e-8)
            n += 1
    return total / n
