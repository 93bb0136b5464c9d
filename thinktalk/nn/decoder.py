"""The decoder-only transformer behind every LLM of both families.

One module serves the Qwen2.5 Thinker (qkv biases, contiguous TMRoPE), the Qwen2.5 Talker (the same,
with a narrower token table), the Qwen3 Thinker and Talker (QK-norm, interleaved TMRoPE, mixture of
experts) and the Qwen3 code predictor (QK-norm, 1-D rotary, no token table of its own). What differs
is data — a :class:`DecoderSpec` and the feed-forward each layer gets — not code.

The KV cache is passed in (a generation state owns it, see :mod:`thinktalk.nn.cache`); without one
the decoder is a plain causal forward, which is what training uses. ``gradient_checkpointing``
recomputes each layer in the backward pass instead of keeping its activations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from thinktalk.generation import compiled
from thinktalk.nn.attention import attention, causal_mask
from thinktalk.nn.cache import KVCache
from thinktalk.nn.norm import RMSNorm
from thinktalk.nn.rotary import apply_rotary, inv_freq, mrope_cos_sin, rotary_cos_sin


# torch.compile settings of a decode step (:meth:`Decoder.body` with one new token, what the models' compile_targets
# name): the generated C++ calls the kernels itself (cpp_wrapper: no Python between the ~10 kernels of a layer; on a
# CPU a tiny decoder's step is all call overhead). Every decoder of a model shares the function, and each meets a few
# shapes (mask or none, hidden states or none, then dynamic cache lengths and batch sizes): past dynamo's default
# limit of 8 graphs.
DECODE_STEP = {"recompile_limit": 32, "options": {"cpp_wrapper": True}}


@dataclass(frozen=True)
class DecoderSpec:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    # TMRoPE: rotary frequencies shared out between (time, height, width); None: plain 1-D positions.
    mrope_section: tuple[int, ...] | None = None
    mrope_interleaved: bool = False  # Qwen3 interleaves the three components, Qwen2.5 keeps them contiguous
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm on every query/key head before the rotation
    vocab_size: int = 0  # 0: no token table (the code predictor keeps one per codebook itself)
    embed_dim: int | None = None  # token table width when it is not hidden_size (the Qwen2.5 Talker's)
    embed_name: str = "embed_tokens"  # the checkpoint's name for it (the Qwen3 Talker's is codec_embedding)


@dataclass
class DecoderOutput:
    last_hidden_state: torch.Tensor
    # As the reference's output_hidden_states: (embeddings, after layer 1, ..., after the last layer),
    # the last one replaced by the final-normed state; len = num_layers + 1.
    hidden_states: tuple[torch.Tensor, ...] | None = None


class Attention(nn.Module):
    """GQA self-attention with rotary positions (and, for Qwen3, per-head RMSNorm on q and k)."""

    def __init__(self, spec: DecoderSpec, layer: int):
        super().__init__()
        self.layer = layer
        self.heads, self.kv_heads, self.head_dim = spec.num_attention_heads, spec.num_key_value_heads, spec.head_dim
        dim = spec.hidden_size
        self.q_proj = nn.Linear(dim, self.heads * self.head_dim, bias=spec.qkv_bias)
        self.k_proj = nn.Linear(dim, self.kv_heads * self.head_dim, bias=spec.qkv_bias)
        self.v_proj = nn.Linear(dim, self.kv_heads * self.head_dim, bias=spec.qkv_bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, dim, bias=spec.o_bias)
        self.q_norm = RMSNorm(self.head_dim, spec.rms_norm_eps) if spec.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, spec.rms_norm_eps) if spec.qk_norm else None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        is_causal: bool,
        cache: KVCache | None,
        slots: torch.Tensor | None,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q.transpose(1, 2), cos, sin), apply_rotary(k.transpose(1, 2), cos, sin)
        if cache is not None:
            k, v = cache.write(self.layer, k, v, slots)
        out = attention(q, k, v, mask=mask, is_causal=is_causal)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class DecoderLayer(nn.Module):
    def __init__(self, spec: DecoderSpec, layer: int, mlp: nn.Module):
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = Attention(spec, layer)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = mlp

    def forward(self, x, cos, sin, mask, is_causal, cache, slots):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, is_causal, cache, slots)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """Token table (optional) + layers + final norm. ``mlp(layer)`` builds each layer's feed-forward."""

    # A tensor-parallel driver (thinktalk.parallel.Driver) sets this on rank 0: every forward and new cache
    # is then sent to the worker ranks first, which run their shards of the same layers in step.
    mirror = None

    def __init__(self, spec: DecoderSpec, mlp: Callable[[int], nn.Module]):
        super().__init__()
        self.spec = spec
        self.embed_name = spec.embed_name
        if spec.vocab_size:
            self.add_module(spec.embed_name, nn.Embedding(spec.vocab_size, spec.embed_dim or spec.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(spec, i, mlp(i)) for i in range(spec.num_hidden_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.gradient_checkpointing = False
        self.init_buffers()

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        self.register_buffer("inv_freq", inv_freq(self.spec.head_dim, self.spec.rope_theta, device=device), persistent=False)

    @property
    def embedding(self) -> nn.Embedding:
        return getattr(self, self.embed_name)

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None, device=None) -> KVCache:
        w, s = self.norm.weight, self.spec
        cache = KVCache.allocate(
            s.num_hidden_layers, batch, s.num_key_value_heads, s.head_dim, max_len, dtype or w.dtype, device or w.device
        )
        if self.mirror is not None:
            self.mirror.new_cache(cache, batch, max_len, dtype or w.dtype)
        return cache

    def rotary(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, 1, T, D] (or [1, 1, T, D]) for TMRoPE ``[3, B, T]`` or 1-D ``[B, T]`` / ``[T]`` positions."""
        s = self.spec
        freq = self.inv_freq.to(position_ids.device)
        if s.mrope_section is not None:
            cos, sin = mrope_cos_sin(freq, position_ids, s.mrope_section, interleaved=s.mrope_interleaved)
        else:
            cos, sin = rotary_cos_sin(freq, position_ids if position_ids.dim() == 2 else position_ids[None])
        # The reference rotates the LLMs' q/k with cos/sin cast to the activation dtype.
        return cos.to(dtype)[:, None], sin.to(dtype)[:, None]

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        output_hidden_states: bool = False,
        visual_mask: torch.Tensor | None = None,
        deepstack: list[torch.Tensor] | tuple[torch.Tensor, ...] | None = None,
        active=None,
    ) -> DecoderOutput:
        """inputs_embeds [B, T, H] → normed hidden states (and every layer's, when asked).

        ``position_ids``: TMRoPE [3, B, T] or 1-D [B, T]; None (1-D models with a cache only) uses the
        cache slots as positions. ``attention_mask``: [B, T] (or [B, past + T]; its last T columns are
        used) with 1 for real tokens and 0 for padding; or, without a cache, a 4-D mask [B, 1, T, T]
        (boolean: may attend; or additive) for packed sequences. With a cache the new keys/values go
        into its next slots (see :class:`~thinktalk.nn.cache.KVCache`); ``active`` (host booleans per row,
        with a cache) is the exec mask: rows where it is False are computed but write nothing.

        Deepstack (Qwen3): ``deepstack[i]`` [visual tokens, H] is added after layer i to the rows where
        ``visual_mask`` [B, T] is set; ``hidden_states`` report the layer outputs before that addition
        (as the reference does).
        """
        args = dict(inputs_embeds=inputs_embeds, position_ids=position_ids, attention_mask=attention_mask, cache=cache,
                    output_hidden_states=output_hidden_states, visual_mask=visual_mask, deepstack=deepstack, active=active)  # fmt: skip
        if self.mirror is not None:
            return self.mirror.forward(self, args)
        return self.run(**args)

    def run(
        self, inputs_embeds, position_ids, attention_mask, cache, output_hidden_states, visual_mask, deepstack, active
    ):
        """The forward pass itself (``forward`` without the tensor-parallel mirroring)."""
        x = inputs_embeds
        b, t, _ = x.shape
        slots = None
        if cache is not None:
            new_valid = None if attention_mask is None else attention_mask[:, -t:]
            slots = cache.reserve(t, new_valid, active)
            mask, is_causal = cache.attention_mask(slots, x.dtype)
        else:
            mask, is_causal = causal_mask(t, attention_mask, x.dtype, x.device)
        if position_ids is None:
            if slots is None:
                raise ValueError("position_ids are needed without a cache")
            position_ids = slots
        # A decode step (inference, one token, not tensor-parallel: its all-reduces stay eager) is compiled where registered.
        if cache is not None and t == 1 and deepstack is None and self.mirror is None and not torch.is_grad_enabled():
            x, states = compiled.call(self, "body", x, position_ids, mask, is_causal, cache, slots, output_hidden_states)
        else:
            x, states = self.body(x, position_ids, mask, is_causal, cache, slots, output_hidden_states, visual_mask,
                                  deepstack)  # fmt: skip
        return DecoderOutput(last_hidden_state=x, hidden_states=tuple(states) if states is not None else None)

    def body(self, x, position_ids, mask, is_causal, cache, slots, want_states, visual_mask=None, deepstack=None):
        """Rotary, the layers and the final norm, with the mask and cache slots prepared (``run`` does that on
        the host). A decode step's body is what :func:`thinktalk.compile_speech` compiles: it reads no host state (the
        cache's ``end`` is a plain int), so it is one graph for every step."""
        cos, sin = self.rotary(position_ids.to(x.device), x.dtype)
        states = [x] if want_states else None
        use_checkpoint = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for i, layer in enumerate(self.layers):
            if use_checkpoint:
                x = checkpoint(layer, x, cos, sin, mask, is_causal, cache, slots, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, is_causal, cache, slots)
            if states is not None:
                states.append(x)
            if deepstack is not None and i < len(deepstack):
                x = x.clone()
                x[visual_mask] = x[visual_mask] + deepstack[i].to(x.dtype)
        x = self.norm(x)
        if states is not None:
            states[-1] = x
        return x, states
