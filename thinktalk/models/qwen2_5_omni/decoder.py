"""The Qwen2 decoder with multimodal rotary positions: the Thinker's LLM and the Talker's body.

GQA attention with q/k/v biases, RMSNorm, SwiGLU. Takes input embeddings and 3D position ids; the
KV cache is passed in by the caller (a generation session owns it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from thinktalk.nn.attention import attention, causal_mask
from thinktalk.nn.cache import KVCache
from thinktalk.nn.mlp import GatedMLP
from thinktalk.nn.norm import RMSNorm
from thinktalk.nn.rotary import apply_rotary, inv_freq, mrope_cos_sin


@dataclass(frozen=True)
class DecoderSpec:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, ...]
    hidden_act: str = "silu"

    @classmethod
    def of(cls, cfg) -> DecoderSpec:
        """From a TextConfig or TalkerConfig (both carry these fields)."""
        return cls(
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_hidden_layers,
            num_attention_heads=cfg.num_attention_heads,
            num_key_value_heads=cfg.num_key_value_heads,
            head_dim=cfg.head_dim,
            rms_norm_eps=cfg.rms_norm_eps,
            rope_theta=cfg.rope_theta,
            mrope_section=tuple(cfg.mrope_section),
            hidden_act=cfg.hidden_act,
        )


@dataclass
class DecoderOutput:
    last_hidden_state: torch.Tensor
    # (embeddings, after layer 1, ..., after the last layer *before* the final norm, ... final normed)
    # as the reference's output_hidden_states: len = num_layers + 1, the last one normed.
    hidden_states: tuple[torch.Tensor, ...] | None = None


class Attention(nn.Module):
    def __init__(self, spec: DecoderSpec, layer: int):
        super().__init__()
        self.layer = layer
        self.heads, self.kv_heads, self.head_dim = spec.num_attention_heads, spec.num_key_value_heads, spec.head_dim
        self.q_proj = nn.Linear(spec.hidden_size, self.heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(spec.hidden_size, self.kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(spec.hidden_size, self.kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.heads * self.head_dim, spec.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        out = attention(q, k, v, mask=mask, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class DecoderLayer(nn.Module):
    def __init__(self, spec: DecoderSpec, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = Attention(spec, layer)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = GatedMLP(spec.hidden_size, spec.intermediate_size, spec.hidden_act)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """``embed_tokens`` + layers + final norm. ``embed_dim`` may differ from the width (the Talker's does)."""

    def __init__(self, spec: DecoderSpec, vocab_size: int, embed_dim: int | None = None):
        super().__init__()
        self.spec = spec
        self.embed_tokens = nn.Embedding(vocab_size, embed_dim or spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec, i) for i in range(spec.num_hidden_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None, device=None) -> KVCache:
        w = self.norm.weight
        s = self.spec
        return KVCache.allocate(
            s.num_hidden_layers, batch, s.num_key_value_heads, s.head_dim, max_len, dtype or w.dtype, device or w.device
        )

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        output_hidden_states: bool = False,
    ) -> DecoderOutput:
        """inputs_embeds [B, T, H]; position_ids [3, B, T]; attention_mask [B, past + T] (1 = real token).

        With a cache, the new keys/values are written after ``cache.length`` and the cache advances by T.
        """
        x = inputs_embeds
        b, t, _ = x.shape
        past = cache.length if cache is not None else 0
        freq = inv_freq(self.spec.head_dim, self.spec.rope_theta, device=x.device)
        cos, sin = mrope_cos_sin(freq, position_ids.to(x.device), self.spec.mrope_section)
        cos, sin = cos.to(x.dtype)[:, None], sin.to(x.dtype)[:, None]
        mask = causal_mask(t, past + t, attention_mask, x.dtype, x.device)
        states = [x] if output_hidden_states else None
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache)
            if states is not None:
                states.append(x)
        x = self.norm(x)
        if states is not None:
            states[-1] = x
        if cache is not None:
            cache.advance(t)
        return DecoderOutput(last_hidden_state=x, hidden_states=tuple(states) if states is not None else None)
