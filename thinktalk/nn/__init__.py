"""Layers shared by every model family: norms, rotary embeddings, attention, MLPs, KV caches."""

from thinktalk.nn.attention import attention, causal_mask, varlen_attention
from thinktalk.nn.cache import KVCache
from thinktalk.nn.mlp import GatedMLP
from thinktalk.nn.norm import RMSNorm
from thinktalk.nn.rotary import apply_rotary, inv_freq, mrope_cos_sin, rotary_cos_sin, rotate_half, vision_cos_sin

__all__ = [
    "GatedMLP",
    "KVCache",
    "RMSNorm",
    "apply_rotary",
    "attention",
    "causal_mask",
    "inv_freq",
    "mrope_cos_sin",
    "rotary_cos_sin",
    "varlen_attention",
    "vision_cos_sin",
    "rotate_half",
]
