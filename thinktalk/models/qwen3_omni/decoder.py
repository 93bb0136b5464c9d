"""The Qwen3-MoE decoder with interleaved multimodal rotary positions: the Thinker's LLM and the Talker's body.

GQA attention with RMSNorm on every query/key head (QK-norm) before the rotation, RMSNorm, and a
routed-expert feed-forward (dense SwiGLU in ``mlp_only_layers``). Deepstack: visual features taken
from early vision-encoder layers are added to the hidden states of the visual tokens after the first
LLM layers (prefill only). The KV cache is passed in by the caller.
"""

from __future__ import annotations

import torch
from torch import nn

from thinktalk.models.qwen2_5_omni.decoder import DecoderOutput
from thinktalk.models.qwen3_omni.config import MoEDecoderConfig
from thinktalk.models.qwen3_omni.moe import SparseMoE
from thinktalk.nn.attention import attention, causal_mask
from thinktalk.nn.cache import KVCache
from thinktalk.nn.mlp import GatedMLP
from thinktalk.nn.norm import RMSNorm
from thinktalk.nn.rotary import apply_rotary, inv_freq, mrope_cos_sin

__all__ = ["DecoderOutput", "MoEDecoder", "QKNormAttention"]


class QKNormAttention(nn.Module):
    """GQA attention with per-head RMSNorm on q and k (Qwen3), rotary applied after the norm."""

    def __init__(self, dim: int, heads: int, kv_heads: int, head_dim: int, eps: float, bias: bool, layer: int):
        super().__init__()
        self.layer, self.heads, self.kv_heads, self.head_dim = layer, heads, kv_heads, head_dim
        self.q_proj = nn.Linear(dim, heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(heads * head_dim, dim, bias=bias)
        self.q_norm = RMSNorm(head_dim, eps)
        self.k_norm = RMSNorm(head_dim, eps)

    def forward(self, x, cos, sin, mask, cache: KVCache | None) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, t, self.heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(b, t, self.kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        out = attention(q, k, v, mask=mask, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: MoEDecoderConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = QKNormAttention(
            cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.rms_norm_eps,
            cfg.attention_bias, layer,
        )
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.is_moe_layer(layer):
            self.mlp = SparseMoE(
                cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts, cfg.num_experts_per_tok, cfg.norm_topk_prob,
                cfg.hidden_act, cfg.shared_expert_intermediate_size,
            )
        else:
            self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class MoEDecoder(nn.Module):
    """Layers + final norm over input embeddings. ``embed_name`` names the token table (the Talker's is
    ``codec_embedding``); the Thinker's is ``embed_tokens``."""

    def __init__(self, cfg: MoEDecoderConfig, embed_name: str = "embed_tokens"):
        super().__init__()
        self.cfg = cfg
        self.embed_name = embed_name
        self.add_module(embed_name, nn.Embedding(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    @property
    def embedding(self) -> nn.Embedding:
        return getattr(self, self.embed_name)

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None, device=None) -> KVCache:
        w, c = self.norm.weight, self.cfg
        return KVCache.allocate(
            c.num_hidden_layers, batch, c.num_key_value_heads, c.head_dim, max_len, dtype or w.dtype, device or w.device
        )

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        output_hidden_states: bool = False,
        visual_mask: torch.Tensor | None = None,
        deepstack: list[torch.Tensor] | tuple[torch.Tensor, ...] | None = None,
    ) -> DecoderOutput:
        """inputs_embeds [B, T, H]; position_ids [3, B, T]; attention_mask [B, past + T] (1 = real token).

        ``deepstack[i]`` ([visual tokens, H]) is added after layer i to the rows where ``visual_mask``
        [B, T] is set. ``hidden_states`` are the layer outputs *before* that addition (what the
        reference reports), the last one after the final norm.
        """
        x = inputs_embeds
        b, t, _ = x.shape
        past = cache.length if cache is not None else 0
        freq = inv_freq(self.cfg.head_dim, self.cfg.rope_theta, device=x.device)
        cos, sin = mrope_cos_sin(freq, position_ids.to(x.device), self.cfg.mrope_section, interleaved=True)
        cos, sin = cos.to(x.dtype)[:, None], sin.to(x.dtype)[:, None]
        mask = causal_mask(t, past + t, attention_mask, x.dtype, x.device)
        states = [x] if output_hidden_states else None
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, cache)
            if states is not None:
                states.append(x)
            if deepstack is not None and i < len(deepstack):
                x = x.clone()
                x[visual_mask] = x[visual_mask] + deepstack[i].to(x.dtype)
        x = self.norm(x)
        if states is not None:
            states[-1] = x
        if cache is not None:
            cache.advance(t)
        return DecoderOutput(last_hidden_state=x, hidden_states=tuple(states) if states is not None else None)
