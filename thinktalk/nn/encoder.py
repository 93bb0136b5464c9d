"""The pre-norm Whisper-style encoder layer shared by both families' audio encoders."""

from __future__ import annotations

import torch
from torch import nn

from thinktalk.nn.attention import varlen_attention
from thinktalk.nn.mlp import activation


class EncoderAttention(nn.Module):
    """Bidirectional attention within the segments given by ``cu_seqlens`` (audio windows)."""

    def __init__(self, dim: int, heads: int, k_bias: bool):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim, bias=True)
        self.k_proj = nn.Linear(dim, dim, bias=k_bias)  # Whisper's key projection has no bias; AuT's has one
        self.v_proj = nn.Linear(dim, dim, bias=True)
        self.out_proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        q = self.q_proj(x).view(n, self.heads, -1)
        k = self.k_proj(x).view(n, self.heads, -1)
        v = self.v_proj(x).view(n, self.heads, -1)
        return self.out_proj(varlen_attention(q, k, v, cu_seqlens).reshape(n, -1))


class EncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, ffn_dim: int, act: str, k_bias: bool = False):
        super().__init__()
        self.self_attn = EncoderAttention(dim, heads, k_bias)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim)
        self.act = activation(act)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), cu_seqlens)
        x = x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))
        if x.dtype == torch.float16:
            bound = torch.finfo(x.dtype).max - 1000
            x = x.clamp(-bound, bound)
        return x
