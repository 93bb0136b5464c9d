"""The flow-matching DiT of Qwen2.5-Omni's Token2Wav: codec ids (50 Hz) → log-mel (100 Hz).

The DiT predicts a velocity field v(x, t) that carries Gaussian noise (t = 0) to a mel spectrogram
(t = 1). Its inputs at every frame: the current state x (80 mel bins), the codec embedding (each code
repeated ``repeats`` = 2 times), the speaker's ``cond`` vector, and an ECAPA-TDNN embedding of the
speaker's reference mel; the time t modulates every layer (adaptive LayerNorm).

Attention is *block-local*: frames are grouped in blocks of ``block_size`` (24 frames = 0.24 s); a
frame sees its own block, plus the previous block in ``look_backward_layers`` and the next block in
``look_ahead_layers``. One DiT pass therefore reaches ``len(look_backward_layers)`` blocks back and
``len(look_ahead_layers)`` blocks ahead; the ODE solver calls it many times, so the final mel depends
on (quickly fading) context further away — what the sliding-window streaming in ``token2wav`` bounds.

:func:`solve` integrates the ODE with the reference's Runge–Kutta (3/8 rule) over "sway"-warped time
points, with classifier-free guidance (a second, unconditioned batch half: no speaker, no codes).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from thinktalk.generation import compiled
from thinktalk.models.qwen2_5_omni.config import DiTConfig
from thinktalk.nn.rotary import apply_rotary, inv_freq, rotary_cos_sin

# ---------------------------------------------------------------------------------------------------
# ECAPA-TDNN speaker encoder (reads the reference mel; names as in the checkpoint)
# ---------------------------------------------------------------------------------------------------


def _conv(cin: int, cout: int, kernel: int, dilation: int = 1) -> nn.Conv1d:
    return nn.Conv1d(cin, cout, kernel, dilation=dilation, padding="same", padding_mode="reflect")


class TDNNBlock(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, dilation: int):
        super().__init__()
        self.conv = _conv(cin, cout, kernel, dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(x))


class Res2NetBlock(nn.Module):
    """Channels split in ``scale`` groups; group i (i ≥ 1) is convolved after adding group i-1's output."""

    def __init__(self, channels: int, scale: int, kernel: int, dilation: int):
        super().__init__()
        self.scale = scale
        width = channels // scale
        self.blocks = nn.ModuleList(TDNNBlock(width, width, kernel, dilation) for _ in range(scale - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = list(torch.chunk(x, self.scale, dim=1))
        out = [parts[0]]
        for i in range(1, self.scale):
            out.append(self.blocks[i - 1](parts[i] if i == 1 else parts[i] + out[-1]))
        return torch.cat(out, dim=1)


class SEBlock(nn.Module):
    """Squeeze-excitation: channel gates from the time-averaged features."""

    def __init__(self, channels: int, se_channels: int):
        super().__init__()
        self.conv1 = _conv(channels, se_channels, 1)
        self.conv2 = _conv(se_channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.conv2(F.relu(self.conv1(x.mean(dim=2, keepdim=True)))))
        return x * gate


class SERes2NetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, scale: int, se_channels: int, kernel: int, dilation: int):
        super().__init__()
        self.tdnn1 = TDNNBlock(cin, cout, 1, 1)
        self.res2net_block = Res2NetBlock(cout, scale, kernel, dilation)
        self.tdnn2 = TDNNBlock(cout, cout, 1, 1)
        self.se_block = SEBlock(cout, se_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.se_block(self.tdnn2(self.res2net_block(self.tdnn1(x))))


class AttentiveStatsPooling(nn.Module):
    """Mean and standard deviation over time, weighted by a per-channel attention over frames."""

    def __init__(self, channels: int, attention_channels: int):
        super().__init__()
        self.tdnn = TDNNBlock(channels * 3, attention_channels, 1, 1)
        self.conv = _conv(attention_channels, channels, 1)

    @staticmethod
    def _stats(x: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = (weights * x).sum(2)
        std = torch.sqrt((weights * (x - mean.unsqueeze(2)).pow(2)).sum(2).clamp(1e-12))
        return mean, std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[-1]
        # The reference builds an all-ones length mask and divides by its sum: uniform weights 1/T.
        uniform = torch.ones(x.shape[0], 1, t, dtype=x.dtype, device=x.device)
        mean, std = self._stats(x, uniform / uniform.sum(dim=2, keepdim=True))
        context = torch.cat([x, mean.unsqueeze(2).expand(-1, -1, t), std.unsqueeze(2).expand(-1, -1, t)], dim=1)
        attention = F.softmax(self.conv(torch.tanh(self.tdnn(context))), dim=2)
        mean, std = self._stats(x, attention)
        return torch.cat((mean, std), dim=1).unsqueeze(2)


class ECAPA(nn.Module):
    """ECAPA-TDNN: reference mel [B, T, mel_dim] → speaker embedding [B, enc_dim]."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        ch, ks, dil = cfg.enc_channels, cfg.enc_kernel_sizes, cfg.enc_dilations
        if not len(ch) == len(ks) == len(dil):
            raise ValueError("dit_config: enc_channels, enc_kernel_sizes and enc_dilations need the same length")
        blocks: list[nn.Module] = [TDNNBlock(cfg.mel_dim, ch[0], ks[0], dil[0])]
        for i in range(1, len(ch) - 1):
            blocks.append(SERes2NetBlock(ch[i - 1], ch[i], cfg.enc_res2net_scale, cfg.enc_se_channels, ks[i], dil[i]))
        self.blocks = nn.ModuleList(blocks)
        self.mfa = TDNNBlock(ch[-1], ch[-1], ks[-1], dil[-1])
        self.asp = AttentiveStatsPooling(ch[-1], cfg.enc_attention_channels)
        self.fc = _conv(ch[-1] * 2, cfg.enc_dim, 1)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        x = mel.transpose(1, 2)
        outs = []
        for block in self.blocks:
            x = block(x)
            outs.append(x)
        # Multi-layer feature aggregation: every SE-Res2Net block's output, not the first TDNN's.
        x = self.mfa(torch.cat(outs[1:], dim=1))
        return self.fc(self.asp(x)).squeeze(-1)


# ---------------------------------------------------------------------------------------------------
# DiT
# ---------------------------------------------------------------------------------------------------


class TimestepEmbedding(nn.Module):
    """t ∈ [0, 1] → sinusoids of 1000·t (256 dims) → MLP."""

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.time_mlp = nn.ModuleList([nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim)])

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freq = torch.exp(torch.arange(half, device=t.device).float() * -(math.log(10000) / (half - 1)))
        angle = 1000 * t.unsqueeze(1) * freq.unsqueeze(0)
        h = torch.cat((angle.sin(), angle.cos()), dim=-1).type_as(t)
        for layer in self.time_mlp:
            h = layer(h)
        return h


class CodecEmbedding(nn.Module):
    """Codec ids [B, N] → [B, N·repeats, emb_dim]; id 0 is the "no code" embedding of the unconditioned pass."""

    def __init__(self, num_embeds: int, dim: int, repeats: int):
        super().__init__()
        self.repeats = repeats
        self.codec_embed = nn.Embedding(num_embeds + 1, dim)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return torch.repeat_interleave(self.codec_embed(codes), self.repeats, dim=1)


class InputEmbedding(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.proj = nn.Linear(cfg.mel_dim + cfg.enc_dim + cfg.enc_emb_dim + cfg.emb_dim, cfg.hidden_size)
        self.spk_encoder = ECAPA(cfg)

    def forward(self, x: torch.Tensor, speaker: torch.Tensor, codes: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x [B, T, mel], speaker (ECAPA output) [B, enc_dim], codes [B, T, emb], cond [B, T, enc_emb]."""
        speaker = speaker.unsqueeze(1).expand(-1, x.shape[1], -1)
        return self.proj(torch.cat((x, speaker, codes, cond), dim=-1))


class AdaLayerNormZero(nn.Module):
    """LayerNorm modulated by the time embedding: 6 vectors (shift/scale/gate for attention and MLP)."""

    def __init__(self, dim: int, chunks: int = 6):
        super().__init__()
        self.linear = nn.Linear(dim, dim * chunks)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.chunks = chunks

    def forward(self, x: torch.Tensor, emb: torch.Tensor):
        parts = torch.chunk(self.linear(F.silu(emb)), self.chunks, dim=1)
        if self.chunks == 2:  # the final norm: (scale, shift)
            scale, shift = parts
            return self.norm(x) * (1 + scale)[:, None, :] + shift[:, None, :]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = parts
        return self.norm(x) * (1 + scale_msa[:, None]) + shift_msa[:, None], gate_msa, shift_mlp, scale_mlp, gate_mlp


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int):
        super().__init__()
        # ``ff.0`` and ``ff.3`` in the checkpoint (1 and 2 were the activation and dropout).
        self.ff = nn.ModuleList([nn.Linear(dim, dim * mult), nn.GELU(approximate="tanh"), nn.Identity(), nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.ff:
            x = layer(x)
        return x


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) → (x0, x2, ..., x1, x3, ...): the checkpoint's rotary pairs adjacent dims."""
    return torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)


class DiTAttention(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        inner = cfg.num_attention_heads * cfg.head_dim
        self.to_q = nn.Linear(cfg.hidden_size, inner)
        self.to_k = nn.Linear(cfg.hidden_size, inner)
        self.to_v = nn.Linear(cfg.hidden_size, inner)
        self.to_out = nn.ModuleList([nn.Linear(inner, cfg.hidden_size)])

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, allowed) -> torch.Tensor:
        """``allowed``: the [T, T] (or [B, T, T]) mask of visible keys, or ``(block_size, back, ahead)`` when the
        frames start on a block border: then every block attends its neighbour blocks only (no mask over T²)."""
        b, t, _ = x.shape
        q = self.to_q(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.to_k(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        v = self.to_v(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        # Only the first head is rotated: the model was trained that way (a bug the checkpoint keeps).
        q0 = apply_rotary(deinterleave(q[:, :1]), cos, sin)
        k0 = apply_rotary(deinterleave(k[:, :1]), cos, sin)
        q = torch.cat([q0, q[:, 1:]], dim=1)
        k = torch.cat([k0, k[:, 1:]], dim=1)
        if isinstance(allowed, tuple):
            out = block_local_attention(q, k, v, *allowed)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return self.to_out[0](out.transpose(1, 2).reshape(b, t, -1))


def block_local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int, back: int, ahead: int) -> torch.Tensor:
    """Attention [B, H, T, D] where the frames of block i see the keys of blocks i − back .. i + ahead (blocks of
    ``block`` frames from frame 0) — the DiT's mask, computed per block: T·(back + 1 + ahead)·block scores, not T².
    Equal to the masked full attention to float rounding (tested)."""
    b, h, t, d = q.shape
    nb = -(-t // block)
    pad = nb * block - t
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    qb = q.view(b, h, nb, block, d)
    kb, vb = k.view(b, h, nb, block, d), v.view(b, h, nb, block, d)
    offsets = range(-back, ahead + 1)

    def neighbours(x: torch.Tensor) -> torch.Tensor:  # [b, h, nb, W, d]: block i's keys from blocks i + o
        x = F.pad(x, (0, 0, 0, 0, back, ahead))
        return torch.cat([x[:, :, back + o : back + o + nb] for o in offsets], dim=3)

    frame = (torch.arange(nb, device=q.device)[:, None, None] + torch.tensor(list(offsets), device=q.device)[None, :, None]) * block
    frame = frame + torch.arange(block, device=q.device)[None, None, :]  # [nb, offsets, block]: key frame index
    valid = ((frame >= 0) & (frame < t)).reshape(nb, 1, -1)  # padded and out-of-range keys are invisible
    out = F.scaled_dot_product_attention(qb, neighbours(kb), neighbours(vb), attn_mask=valid)
    return out.reshape(b, h, nb * block, d)[:, :, :t]


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig, look_ahead: int, look_backward: int):
        super().__init__()
        self.look_ahead, self.look_backward = look_ahead, look_backward
        self.attn_norm = AdaLayerNormZero(cfg.hidden_size)
        self.attn = DiTAttention(cfg)
        self.ff_norm = nn.LayerNorm(cfg.hidden_size, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(cfg.hidden_size, cfg.ff_mult)

    def forward(self, x, t_emb, cos, sin, block_diff):
        """``block_diff``: [T, T] / [B, T, T] key block − query block, or the block size when the frames start
        on a block border (block-local attention)."""
        h, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.attn_norm(x, t_emb)
        if isinstance(block_diff, int):
            allowed = (block_diff, self.look_backward, self.look_ahead)
        else:
            allowed = (block_diff >= -self.look_backward) & (block_diff <= self.look_ahead)
            if allowed.dim() == 3:  # one mask per row [B, T, T] (windows at different places): broadcast over heads
                allowed = allowed[:, None]
        x = x + gate_msa.unsqueeze(1) * self.attn(h, cos, sin, allowed)
        h = self.ff_norm(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        return x + gate_mlp.unsqueeze(1) * self.ff(h)


def block_diff(length: int, block_size: int, start: int | torch.Tensor = 0, device=None) -> torch.Tensor:
    """[T, T] key block − query block, for frames ``start .. start+T`` of the utterance
    ([B, T, T] when ``start`` is a tensor [B]: one window per row).

    >>> block_diff(4, 2).tolist()
    [[0, 0, 1, 1], [0, 0, 1, 1], [-1, -1, 0, 0], [-1, -1, 0, 0]]
    """
    frames = torch.arange(length, device=device)
    if isinstance(start, torch.Tensor):
        frames = frames[None, :] + start.to(device)[:, None]
    blocks = (frames + (0 if isinstance(start, torch.Tensor) else start)) // block_size
    return blocks[..., None, :] - blocks[..., :, None]


class DiT(nn.Module):
    """The velocity network; see the module docstring. Module names follow the checkpoint."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        self.time_embed = TimestepEmbedding(cfg.hidden_size)
        self.text_embed = CodecEmbedding(cfg.num_embeds, cfg.emb_dim, cfg.repeats)
        self.input_embed = InputEmbedding(cfg)
        self.transformer_blocks = nn.ModuleList(
            DiTBlock(cfg, int(i in cfg.look_ahead_layers), int(i in cfg.look_backward_layers))
            for i in range(cfg.num_hidden_layers)
        )
        self.norm_out = AdaLayerNormZero(cfg.hidden_size, chunks=2)
        self.proj_out = nn.Linear(cfg.hidden_size, cfg.mel_dim)
        self.init_buffers()

    block_local = True  # False: attention over the whole window with a [T, T] mask (the plain path)
    # Below this many blocks the masked full attention is as fast on a CPU (measured: 2.7x faster at 40 blocks).
    BLOCK_LOCAL_FROM = 12

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        self.register_buffer("inv_freq", inv_freq(self.cfg.head_dim, self.cfg.rope_theta, device=device), persistent=False)

    @property
    def num_codes(self) -> int:
        """Codec ids the embedding accepts: 0 .. num_codes - 1."""
        return self.text_embed.codec_embed.num_embeddings

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        code_embeds: torch.Tensor,
        cond: torch.Tensor,
        speaker: torch.Tensor,
        start: int | torch.Tensor = 0,
    ) -> torch.Tensor:
        """One velocity evaluation. x [B, T, mel]; t [B]; code_embeds [B, T, emb]; cond [B, T, enc_emb];
        speaker [B, enc_dim]. ``start`` is the index of x's first frame in the utterance (sliding windows):
        blocks and rotary positions are counted from the utterance start, as for the whole utterance;
        a tensor [B] gives every row its own (a batch of windows of several utterances)."""
        t_emb = self.time_embed(t)
        h = self.input_embed(x, speaker, code_embeds, cond)
        length = h.shape[1]
        positions = torch.arange(length, device=h.device)
        if isinstance(start, torch.Tensor):
            positions = positions[None, :] + start.to(h.device)[:, None]
        else:
            positions = positions + start
        cos, sin = rotary_cos_sin(self.inv_freq, positions)
        cos, sin = cos.to(h.dtype), sin.to(h.dtype)
        if cos.dim() == 3:  # [B, T, D] -> [B, 1, T, D]: per row, broadcast over the rotated head
            cos, sin = cos[:, None], sin[:, None]
        bs = self.cfg.block_size
        if self.block_local and length >= self.BLOCK_LOCAL_FROM * bs and (
            bool((start % bs == 0).all()) if isinstance(start, torch.Tensor) else start % bs == 0
        ):  # fmt: skip
            diff = bs  # blocks start at frame 0 of the window: attention block by block
        else:
            diff = block_diff(length, bs, start, h.device)
        for block in self.transformer_blocks:
            h = block(h, t_emb, cos, sin, diff)
        return self.proj_out(self.norm_out(h, t_emb))


# ---------------------------------------------------------------------------------------------------
# The ODE
# ---------------------------------------------------------------------------------------------------


def time_points(num_steps: int, sway_coefficient: float | None = -1.0, device=None) -> torch.Tensor:
    """``num_steps`` points from 0 to 1, warped by t + s·(cos(πt/2) − 1 + t) (s < 0 crowds them near 0).

    >>> time_points(3, None).tolist()
    [0.0, 0.5, 1.0]
    """
    t = torch.linspace(0, 1, num_steps, device=device, dtype=torch.float32)
    if sway_coefficient is not None:
        t = t + sway_coefficient * (torch.cos(torch.pi / 2 * t) - 1 + t)
    return t


def rk4_step(f: Callable, t0: torch.Tensor, t1: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One Runge–Kutta step of the 3/8 rule (the reference's "RK4"): y(t1) from y(t0)."""
    dt = t1 - t0
    k1 = f(t0, y)
    k2 = f(t0 + dt * (1 / 3), y + dt * k1 * (1 / 3))
    k3 = f(t0 + dt * (2 / 3), y + dt * (k2 - k1 * (1 / 3)))
    k4 = f(t1, y + dt * (k1 - k2 + k3))
    return y + (k1 + 3 * (k2 + k3) + k4) * dt / 8


def solve(
    dit: DiT,
    noise: torch.Tensor,
    codes: torch.Tensor,
    cond: torch.Tensor,
    reference_mel: torch.Tensor,
    num_steps: int = 10,
    guidance_scale: float = 0.5,
    sway_coefficient: float | None = -1.0,
    start: int | torch.Tensor = 0,
) -> torch.Tensor:
    """Integrate the flow from ``noise`` [B, T, mel] to a log-mel [B, T, mel].

    ``codes`` [B, T / repeats] (ids < ``dit.num_codes``); ``cond`` [B, enc_emb_dim] (the speaker's
    ``cond``); ``reference_mel`` [B, T_ref, mel]. With ``guidance_scale`` > 0 every evaluation runs a
    second batch half with no speaker and code 0 everywhere, and returns
    ``v_cond + guidance_scale · (v_cond − v_uncond)``. ``start`` places a window inside the utterance (a tensor [B]: each row's window, as :meth:`DiT.forward`).
    """
    b, frames, _ = noise.shape
    guided = guidance_scale >= 1e-5
    code_embeds = dit.text_embed(codes)[:, :frames]
    cond = cond.unsqueeze(1).expand(-1, frames, -1)
    if guided:
        # The unconditioned half: no reference mel (zeros through ECAPA), no cond vector, code 0 everywhere.
        speaker = dit.input_embed.spk_encoder(torch.cat([reference_mel, torch.zeros_like(reference_mel)]))
        code_embeds = torch.cat([code_embeds, dit.text_embed(torch.zeros_like(codes))[:, :frames]])
        cond = torch.cat([cond, torch.zeros_like(cond)])
    else:
        speaker = dit.input_embed.spk_encoder(reference_mel)

    both = torch.cat([start, start]) if isinstance(start, torch.Tensor) and guided else start

    def velocity(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if not guided:
            return compiled.call(dit, "forward", x, t.repeat(b), code_embeds, cond, speaker, start)
        out = compiled.call(dit, "forward", torch.cat([x, x]), t.repeat(2 * b), code_embeds, cond, speaker, both)
        v_cond, v_uncond = torch.chunk(out, 2, dim=0)
        return v_cond + (v_cond - v_uncond) * guidance_scale

    t = time_points(num_steps, sway_coefficient, noise.device)
    x = noise
    for t0, t1 in zip(t[:-1], t[1:]):
        x = rk4_step(velocity, t0, t1, x)
    return x
