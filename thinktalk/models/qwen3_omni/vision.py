"""Qwen3-Omni vision encoder (the Qwen3-VL ViT).

pixel patches [N, C*T*P*P] (16×16 pixels × 2 frames) → linear patch embedding (+ bias) → + learned
absolute positions, bilinearly resampled from a square grid to the image's patch grid → blocks
(LayerNorm, 2D rotary attention over each frame, GELU MLP) → the merger turns each 2×2 group of
patches into one LLM token. "Deepstack": after the blocks listed in ``deepstack_visual_indexes`` a
separate merger (LayerNorm after the 2×2 shuffle) produces extra features that the LLM adds to the
visual tokens' hidden states after its first layers.

Patches arrive grouped by 2×2 merge block (the processor's order), which every position helper follows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from thinktalk.models.qwen2_5_omni.vision import frame_cu_seqlens, patch_positions
from thinktalk.models.qwen3_omni.config import VisionEncoderConfig
from thinktalk.nn.attention import varlen_attention
from thinktalk.nn.mlp import activation
from thinktalk.nn.rotary import apply_rotary, inv_freq, vision_cos_sin


def bilinear_taps(grid_thw: torch.Tensor, side: int, merge: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices [N, 4] into a ``side × side`` table and weights [N, 4] resampling it to every patch.

    Bilinear with aligned corners (the first/last patch sit exactly on the table's first/last
    entries), patches in merge-block order, frames repeated. Equivalent to
    ``F.interpolate(table, size=(h, w), mode="bilinear", align_corners=True)`` read in that order.
    """
    rows, cols = patch_positions(grid_thw, merge).unbind(-1)
    h = torch.repeat_interleave(grid_thw[:, 1], grid_thw.prod(-1))
    w = torch.repeat_interleave(grid_thw[:, 2], grid_thw.prod(-1))

    def axis(index: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        src = index.float() * (side - 1) / torch.clamp(size - 1, min=1)
        lo = src.floor()
        frac = src - lo
        taps = torch.stack([lo.long(), lo.long() + 1], dim=-1).clamp(0, side - 1)
        return taps, torch.stack([1 - frac, frac], dim=-1)

    rt, rw = axis(rows, h)
    ct, cw = axis(cols, w)
    idx = (rt[:, :, None] * side + ct[:, None, :]).reshape(-1, 4)
    weight = (rw[:, :, None] * cw[:, None, :]).reshape(-1, 4)
    return idx, weight


class VisionAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.heads, -1).unbind(1)
        # Rotary in float32 (the reference does), then back to the activation dtype.
        q = apply_rotary(q.float(), cos, sin).to(x.dtype)
        k = apply_rotary(k.float(), cos, sin).to(x.dtype)
        return self.proj(varlen_attention(q, k, v, cu_seqlens).reshape(n, -1))


class VisionMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.linear_fc1 = nn.Linear(dim, hidden)
        self.linear_fc2 = nn.Linear(hidden, dim)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionEncoderConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.attn = VisionAttention(cfg.hidden_size, cfg.num_heads)
        self.mlp = VisionMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cu_seqlens, cos, sin)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """A Conv3d whose stride equals its kernel: one linear map (with bias) per flattened patch."""

    def __init__(self, cfg: VisionEncoderConfig):
        super().__init__()
        k = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=k, stride=k, bias=True)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        w = self.proj.weight
        return F.linear(patches.to(w.dtype), w.view(w.shape[0], -1), self.proj.bias)


class PatchMerger(nn.Module):
    """2×2 patches → one LLM token. ``postshuffle``: LayerNorm over the merged vector (deepstack mergers)."""

    def __init__(self, dim: int, out_dim: int, merge: int, postshuffle: bool):
        super().__init__()
        self.hidden = dim * merge * merge
        self.postshuffle = postshuffle
        self.ln_q = nn.LayerNorm(self.hidden if postshuffle else dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(self.hidden, self.hidden), nn.GELU(), nn.Linear(self.hidden, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln_q(x.view(-1, self.hidden)) if self.postshuffle else self.ln_q(x).view(-1, self.hidden)
        return self.mlp(x)


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.pos_embed = nn.Embedding(cfg.num_position_embeddings, cfg.hidden_size)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg.hidden_size, cfg.out_hidden_size, cfg.spatial_merge_size, postshuffle=False)
        self.merger_list = nn.ModuleList(
            PatchMerger(cfg.hidden_size, cfg.out_hidden_size, cfg.spatial_merge_size, postshuffle=True)
            for _ in cfg.deepstack_visual_indexes
        )

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """pixel_values [N, C*T*P*P], grid_thw [items, 3] → (LLM tokens [N/4, D], deepstack features, each [N/4, D])."""
        cfg = self.cfg
        grid_thw = grid_thw.cpu()
        device = pixel_values.device
        x = self.patch_embed(pixel_values)
        idx, weight = bilinear_taps(grid_thw, int(cfg.num_position_embeddings**0.5), cfg.spatial_merge_size)
        pos = (self.pos_embed(idx.to(device)) * weight.to(device)[:, :, None]).sum(1)
        x = x + pos.to(x.dtype)
        freq = inv_freq(cfg.head_dim // 2, cfg.rope_theta, device=device)
        cos, sin = vision_cos_sin(freq, patch_positions(grid_thw, cfg.spatial_merge_size).to(device))
        cos, sin = cos[:, None, :], sin[:, None, :]
        cu = frame_cu_seqlens(grid_thw)
        deepstack = []
        for i, block in enumerate(self.blocks):
            x = block(x, cu, cos, sin)
            if i in cfg.deepstack_visual_indexes:
                deepstack.append(self.merger_list[cfg.deepstack_visual_indexes.index(i)](x))
        return self.merger(x), deepstack
