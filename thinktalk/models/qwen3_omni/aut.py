"""AuT, the Qwen3-Omni audio encoder.

mel [128, frames] (10 ms hop) is cut into chunks of ``2 * n_window`` frames (1 s); every chunk goes
through three stride-2 Conv2D layers over (mel, time) (×8 downsampling: 100 frames → 13 tokens,
~12.5 tokens/s), a linear map of (channels × mel) to the model width, and sinusoidal positions that
restart in every chunk. The transformer layers then attend inside windows of ``n_window_infer``
frames' worth of tokens (8 chunks = 104 tokens = 8 s at the published settings). LayerNorm, then a
two-layer projection to the LLM width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from thinktalk.models.qwen2_5_omni.audio import sinusoids
from thinktalk.models.qwen3_omni.config import AudioEncoderConfig
from thinktalk.nn.encoder import EncoderLayer
from thinktalk.nn.mlp import activation
from thinktalk.positions import aut_token_count


def chunk_lengths(frames: list[int], chunk: int) -> list[int]:
    """Mel frames of every conv chunk (clips concatenated), the last chunk of each clip shorter.

    >>> chunk_lengths([250, 100], 100)
    [100, 100, 50, 100]
    """
    out = []
    for n in frames:
        full, rest = divmod(n, chunk)
        out += [chunk] * full + ([rest] if rest else [])
    return out


def conv_length(frames: int) -> int:
    """Time steps after the three stride-2 convs (kernel 3, padding 1)."""
    for _ in range(3):
        frames = (frames - 1) // 2 + 1
    return frames


def attention_windows(tokens: list[int], window: int) -> list[int]:
    """Lengths of the attention windows (``window`` tokens, the last one of each clip shorter).

    >>> attention_windows([30, 8], 13)
    [13, 13, 4, 8]
    """
    out = []
    for n in tokens:
        full, rest = divmod(n, window)
        out += [window] * full + ([rest] if rest else [])
    return out


class AudioEncoder(nn.Module):
    def __init__(self, cfg: AudioEncoderConfig):
        super().__init__()
        self.cfg = cfg
        c = cfg.downsample_hidden_size
        self.conv2d1 = nn.Conv2d(1, c, 3, 2, padding=1)
        self.conv2d2 = nn.Conv2d(c, c, 3, 2, padding=1)
        self.conv2d3 = nn.Conv2d(c, c, 3, 2, padding=1)
        mel_after = cfg.num_mel_bins
        for _ in range(3):
            mel_after = (mel_after + 1) // 2
        self.conv_out = nn.Linear(c * mel_after, cfg.d_model, bias=False)
        self.layers = nn.ModuleList(
            EncoderLayer(cfg.d_model, cfg.encoder_attention_heads, cfg.encoder_ffn_dim, cfg.activation_function, k_bias=True)
            for _ in range(cfg.encoder_layers)
        )
        self.ln_post = nn.LayerNorm(cfg.d_model)
        self.proj1 = nn.Linear(cfg.d_model, cfg.d_model)
        self.proj2 = nn.Linear(cfg.d_model, cfg.output_dim)
        self.act = activation(cfg.activation_function)
        self.init_buffers()

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        self.register_buffer(
            "positional_embedding", sinusoids(self.cfg.max_source_positions, self.cfg.d_model).to(device), persistent=False
        )

    @property
    def tokens_per_chunk(self) -> int:
        return conv_length(2 * self.cfg.n_window)

    def output_lengths(self, feature_lens: torch.Tensor) -> torch.Tensor:
        """Audio tokens per clip (the reference's ``_get_feat_extract_output_lengths``)."""
        return torch.tensor([aut_token_count(n, self.cfg.n_window) for n in feature_lens.tolist()], dtype=torch.long)

    def forward(self, features: torch.Tensor, feature_lens: torch.Tensor) -> torch.Tensor:
        """features [mel, total_frames] (clips concatenated), feature_lens [clips] → [total_tokens, output_dim]."""
        cfg = self.cfg
        device = features.device
        lens = chunk_lengths(feature_lens.tolist(), 2 * cfg.n_window)
        # Every chunk is zero-padded to the longest chunk of the whole batch before the convs. The
        # second and third convs then see gelu(bias) (not zeros) past a short chunk's end, which
        # reaches its last token: matched on purpose, so a clip's tokens depend on that padding.
        chunks = features.T.split(lens, dim=0)
        padded = nn.utils.rnn.pad_sequence(chunks, batch_first=True).transpose(1, 2)  # [C, mel, longest]
        padded = padded[:, None].to(self.conv2d1.weight.dtype)
        out = []
        for part in padded.split(cfg.conv_chunksize, dim=0):  # bounds the conv activations' memory
            h = F.gelu(self.conv2d1(part))
            h = F.gelu(self.conv2d2(h))
            out.append(F.gelu(self.conv2d3(h)))
        h = torch.cat(out)
        c, ch, mel, t = h.shape
        h = self.conv_out(h.permute(0, 3, 1, 2).reshape(c, t, ch * mel))
        h = h + self.positional_embedding[:t].to(h.dtype)
        after = torch.tensor([conv_length(n) for n in lens], device=device)
        keep = torch.arange(t, device=device)[None, :] < after[:, None]
        h = h[keep]  # [tokens, d], chunks concatenated
        window = self.tokens_per_chunk * (cfg.n_window_infer // (2 * cfg.n_window))
        wins = attention_windows(self.output_lengths(feature_lens).tolist(), window)
        cu = F.pad(torch.tensor(wins, device=device).cumsum(0), (1, 0))
        for layer in self.layers:
            h = layer(h, cu)
        return self.proj2(self.act(self.proj1(self.ln_post(h))))
