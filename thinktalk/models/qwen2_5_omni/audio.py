"""Qwen2.5-Omni audio encoder: Whisper-large-v3 style, attention in ~2 s windows, ×2 average pooling.

mel [128, frames] (10 ms hop) → conv (k3) → conv (k3, stride 2) → +sinusoid positions (restarting in
every window of ``2 * n_window`` frames) → transformer layers attending within windows → pairs of
frames averaged → LayerNorm → projection to the LLM width. One output token ≈ 40 ms.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from thinktalk.models.qwen2_5_omni.config import AudioEncoderConfig
from thinktalk.nn.encoder import EncoderLayer


def conv_output_length(frames: torch.Tensor) -> torch.Tensor:
    """Frames after the stride-2 conv."""
    return (frames - 1) // 2 + 1


def window_lengths(frames: list[int], window: int) -> list[int]:
    """Lengths of the attention windows (``window`` mel frames each, the last one shorter) of every clip.

    >>> window_lengths([250, 200], 100)
    [100, 100, 50, 100, 100]
    """
    out = []
    for n in frames:
        full, rest = divmod(n, window)
        out += [window] * full + ([rest] if rest else [])
    return out


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """Whisper's fixed sinusoidal positions [length, channels] (sin half, then cos half)."""
    log_inc = math.log(max_timescale) / (channels // 2 - 1)
    inv = torch.exp(-log_inc * torch.arange(channels // 2).float())
    t = torch.arange(length)[:, None].float() * inv[None, :]
    return torch.cat([t.sin(), t.cos()], dim=1)


class AudioEncoder(nn.Module):
    def __init__(self, cfg: AudioEncoderConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.conv1 = nn.Conv1d(cfg.num_mel_bins, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        self.layers = nn.ModuleList(
            EncoderLayer(cfg.d_model, cfg.encoder_attention_heads, cfg.encoder_ffn_dim, cfg.activation_function, k_bias=False)
            for _ in range(cfg.encoder_layers)
        )
        self.ln_post = nn.LayerNorm(d)
        self.proj = nn.Linear(d, cfg.output_dim)
        # In the checkpoint but unused by the model (the text tokens <|audio_bos|>/<|audio_eos|> are used instead).
        self.audio_bos_eos_token = nn.Embedding(2, cfg.output_dim)
        self.init_buffers()

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        self.register_buffer(
            "positional_embedding", sinusoids(self.cfg.max_source_positions, self.cfg.d_model).to(device), persistent=False
        )

    def forward(self, features: torch.Tensor, feature_lens: torch.Tensor) -> torch.Tensor:
        """features [mel, total_frames] (clips concatenated), feature_lens [clips] → [total_tokens, output_dim]."""
        window = self.cfg.n_window * 2
        lens = window_lengths(feature_lens.tolist(), window)
        chunks = features.T.split(lens, dim=0)
        padded = nn.utils.rnn.pad_sequence(chunks, batch_first=True).transpose(1, 2)  # [W, mel, window]
        padded = padded.to(self.conv1.weight.dtype)
        lens_t = torch.tensor(lens, device=features.device)
        valid = torch.arange(padded.shape[2], device=features.device)[None, :] < lens_t[:, None]
        h = F.gelu(self.conv1(padded)) * valid[:, None, :]
        h = F.gelu(self.conv2(h)).transpose(1, 2)  # [W, window/2, d]
        h = h + self.positional_embedding[: h.shape[1]].to(h.dtype)
        after = conv_output_length(lens_t)
        keep = torch.arange(h.shape[1], device=h.device)[None, :] < after[:, None]
        h = h[keep]  # [tokens after conv, d], windows concatenated
        cu = F.pad(after.cumsum(0), (1, 0))
        for layer in self.layers:
            h = layer(h, cu)
        # Average pooling ×2 within each clip (the windows of a clip are contiguous).
        clip_after = conv_output_length(feature_lens.to(h.device))
        pooled = (clip_after - 2) // 2 + 1
        starts = F.pad(clip_after.cumsum(0)[:-1], (1, 0))
        idx = torch.cat([s + 2 * torch.arange(p, device=h.device) for s, p in zip(starts.tolist(), pooled.tolist())])
        h = (h[idx] + h[idx + 1]) / 2
        return self.proj(self.ln_post(h))
