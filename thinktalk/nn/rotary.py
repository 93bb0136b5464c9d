"""Rotary position embeddings: 1D, multimodal (TMRoPE, 3 sections) and 2D vision.

All angles are computed in float32; callers choose where to cast (the reference casts the text
cos/sin to the activation dtype, but rotates vision q/k in float32).
"""

from __future__ import annotations

import torch


def inv_freq(dim: int, theta: float, device=None) -> torch.Tensor:
    """1 / theta^(2i/dim) for i < dim/2 (float32)."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, with cos/sin broadcast against x."""
    return x * cos + rotate_half(x) * sin


def rotary_cos_sin(freq: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain 1D rotary: positions [..., T] -> cos, sin [..., T, 2*len(freq)] (float32)."""
    angles = positions[..., None].float() * freq.float()
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos(), emb.sin()


def mrope_cos_sin(
    freq: torch.Tensor, position_ids: torch.Tensor, mrope_section: tuple[int, ...], interleaved: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multimodal rotary (TMRoPE): position_ids [3, B, T] (time, height, width) -> cos, sin [B, T, D].

    The D/2 rotary frequencies are shared out between the three position components:
    - contiguous (Qwen2.5-Omni): the first ``mrope_section[0]`` frequencies rotate by time, the next
      ``mrope_section[1]`` by height, the last ``mrope_section[2]`` by width.
    - interleaved (Qwen3-Omni): frequency i uses height if i % 3 == 1 (for i < 3*section[1]), width if
      i % 3 == 2 (for i < 3*section[2]), time otherwise.
    """
    angles = position_ids[..., None].float() * freq.float()  # [3, B, T, D/2]
    if interleaved:
        mixed = angles[0].clone()
        for axis in (1, 2):
            idx = slice(axis, mrope_section[axis] * 3, 3)
            mixed[..., idx] = angles[axis, ..., idx]
    else:
        parts = angles.split(list(mrope_section), dim=-1)
        mixed = torch.cat([p[i % 3] for i, p in enumerate(parts)], dim=-1)
    emb = torch.cat((mixed, mixed), dim=-1)
    return emb.cos(), emb.sin()


def vision_cos_sin(freq: torch.Tensor, hw_positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """2D axial rotary of the vision encoders: hw_positions [N, 2] -> cos, sin [N, 4*len(freq)].

    Height and width each rotate half of the rotary dims with the same frequencies.
    """
    angles = hw_positions[..., None].float() * freq.float()  # [N, 2, F]
    hw = torch.cat((angles[:, 0], angles[:, 1]), dim=-1)
    emb = torch.cat((hw, hw), dim=-1)
    return emb.cos(), emb.sin()
