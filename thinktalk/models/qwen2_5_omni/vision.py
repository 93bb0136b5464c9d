"""Qwen2.5-Omni vision encoder (the Qwen2.5-VL ViT).

pixel patches [N, C*T*P*P] (14×14 pixels × 2 frames) → linear patch embedding → blocks with 2D
rotary positions, attending inside windows of ``window_size`` pixels except the
``fullatt_block_indexes`` blocks, which attend over the whole frame → RMSNorm + MLP merging each 2×2
group of patches into one LLM token.

Patches arrive grouped by 2×2 merge block (the processor's order); window attention reorders the
merge blocks window by window and the merger output is put back in the original order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from thinktalk.models.qwen2_5_omni.config import VisionEncoderConfig
from thinktalk.nn.attention import varlen_attention
from thinktalk.nn.mlp import GatedMLP
from thinktalk.nn.norm import RMSNorm
from thinktalk.nn.rotary import apply_rotary, inv_freq, vision_cos_sin


def patch_positions(grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """(row, column) of every patch [N, 2], patches ordered merge-block by merge-block, frame by frame."""
    out = []
    for t, h, w in grid_thw.tolist():
        rows = torch.arange(h).view(h // merge, merge, 1, 1).expand(-1, -1, w // merge, merge)
        cols = torch.arange(w).view(1, 1, w // merge, merge).expand(h // merge, merge, -1, -1)
        rows = rows.permute(0, 2, 1, 3).flatten()
        cols = cols.permute(0, 2, 1, 3).flatten()
        out.append(torch.stack([rows, cols], dim=-1).repeat(t, 1))
    return torch.cat(out)


def frame_cu_seqlens(grid_thw: torch.Tensor) -> torch.Tensor:
    """Segment bounds for full attention: one segment per frame group (t) of every image/video."""
    sizes = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
    return F.pad(sizes.cumsum(0), (1, 0))


def window_index(grid_thw: torch.Tensor, merge: int, window_size: int, patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge-block order that groups blocks window by window, and the window bounds in patches.

    A window covers ``window_size`` pixels = ``window_size // patch_size // merge`` merge blocks per side;
    windows at the right/bottom edge hold fewer blocks. Returns (block order, cu_seqlens in patches).
    """
    per_side = window_size // merge // patch_size
    unit = merge * merge
    order, bounds, offset = [], [0], 0
    for t, h, w in grid_thw.tolist():
        gh, gw = h // merge, w // merge
        idx = torch.arange(t * gh * gw).reshape(t, gh, gw)
        pad_h, pad_w = per_side - gh % per_side, per_side - gw % per_side
        nh, nw = (gh + pad_h) // per_side, (gw + pad_w) // per_side
        idx = F.pad(idx, (0, pad_w, 0, pad_h), value=-1)
        idx = idx.reshape(t, nh, per_side, nw, per_side).permute(0, 1, 3, 2, 4).reshape(t, nh * nw, -1)
        sizes = (idx >= 0).sum(-1).flatten()
        flat = idx.flatten()
        order.append(flat[flat >= 0] + offset)
        for s in sizes.tolist():
            if s:
                bounds.append(bounds[-1] + s * unit)
        offset += t * gh * gw
    return torch.cat(order), torch.tensor(bounds)


class VisionAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=True)
        self.k = nn.Linear(dim, dim, bias=True)
        self.v = nn.Linear(dim, dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        q = self.q(x).view(n, self.heads, -1)
        k = self.k(x).view(n, self.heads, -1)
        v = self.v(x).view(n, self.heads, -1)
        # Rotary in float32 (the reference does), then back to the activation dtype.
        q = apply_rotary(q.float(), cos, sin).to(x.dtype)
        k = apply_rotary(k.float(), cos, sin).to(x.dtype)
        return self.proj(varlen_attention(q, k, v, cu_seqlens).reshape(n, -1))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionEncoderConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size, eps=1e-6)
        self.norm2 = RMSNorm(cfg.hidden_size, eps=1e-6)
        self.attn = VisionAttention(cfg.hidden_size, cfg.num_heads)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, bias=True)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cu_seqlens, cos, sin)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """A Conv3d whose stride equals its kernel: one linear map per flattened patch."""

    def __init__(self, cfg: VisionEncoderConfig):
        super().__init__()
        k = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=k, stride=k, bias=False)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        w = self.proj.weight
        return F.linear(patches.to(w.dtype), w.view(w.shape[0], -1))


class PatchMerger(nn.Module):
    def __init__(self, out_dim: int, dim: int, merge: int):
        super().__init__()
        self.hidden = dim * merge * merge
        self.ln_q = RMSNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(self.hidden, self.hidden), nn.GELU(), nn.Linear(self.hidden, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.hidden))


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg.out_hidden_size, cfg.hidden_size, cfg.spatial_merge_size)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """pixel_values [N, C*T*P*P], grid_thw [items, 3] → LLM tokens [N / merge², out_hidden_size]."""
        cfg = self.cfg
        merge, unit = cfg.spatial_merge_size, cfg.spatial_merge_size**2
        grid_thw = grid_thw.cpu()
        device = pixel_values.device
        x = self.patch_embed(pixel_values)
        n = x.shape[0]
        order, cu_window = window_index(grid_thw, merge, cfg.window_size, cfg.patch_size)
        order = order.to(device)
        cu_full = frame_cu_seqlens(grid_thw)

        def by_window(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(n // unit, unit, -1)[order].reshape(n, -1)

        x = by_window(x)
        freq = inv_freq(cfg.head_dim // 2, cfg.rope_theta, device=device)
        cos, sin = vision_cos_sin(freq, patch_positions(grid_thw, merge).to(device))
        cos, sin = by_window(cos)[:, None, :], by_window(sin)[:, None, :]
        for i, block in enumerate(self.blocks):
            x = block(x, cu_full if i in cfg.fullatt_block_indexes else cu_window, cos, sin)
        merged = self.merger(x)
        return merged[torch.argsort(order)]
