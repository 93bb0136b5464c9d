"""Scaled dot-product attention and the masks the decoders need."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """q [B, H, Tq, D], k/v [B, Hkv, Tk, D] (H a multiple of Hkv: grouped-query attention) -> [B, H, Tq, D].

    ``mask`` is additive (0 / large negative) and broadcast to [B, H, Tq, Tk]; ``is_causal`` means
    queries and keys coincide (SDPA aligns its causal mask top-left). Key/value heads are shared by
    SDPA itself (``enable_gqa``), never copied.
    """
    gqa = k.shape[1] != q.shape[1]
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal and mask is None and q.shape[-2] > 1, scale=scale, enable_gqa=gqa
    )


def causal_mask(
    t: int, attention_mask: torch.Tensor | None, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor | None, bool]:
    """(additive mask or None, is_causal) for a causal pass over ``t`` tokens without a cache.

    ``attention_mask``: None or [B, t] 1/0 (padding), or a 4-D [B, 1, t, t] mask (boolean: may
    attend; or already additive) for packed sequences. Without padding plain causal attention is
    exact and SDPA takes its fastest path. Rows of left padding get a finite mask (never all -inf),
    so they produce finite garbage instead of NaNs that could leak through later layers.

    ``attention_mask`` may also hold segment ids (packed training rows: 1, 1, 2, 2, 2, 0 = two
    samples and padding): a token then attends only to earlier tokens of its own segment. A plain
    1/0 mask is the one-segment case of the same rule.
    """
    if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.dtype != torch.bool:
        if int(attention_mask.max()) > 1:
            return _segment_mask(t, t, attention_mask[:, -t:], dtype, device), False
    neg = torch.finfo(dtype).min
    if attention_mask is not None and attention_mask.dim() == 4:
        if attention_mask.dtype == torch.bool:
            return torch.zeros(attention_mask.shape, dtype=dtype, device=device).masked_fill(~attention_mask, neg), False
        return attention_mask.to(dtype), False
    if attention_mask is None or bool(attention_mask.all()):
        return None, True
    idx = torch.arange(t, device=device)
    allowed = (idx[None, :] <= idx[:, None])[None, None] & attention_mask[:, None, None, -t:].bool().to(device)
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, neg), False


def _segment_mask(
    q_len: int, kv_len: int, segments: torch.Tensor, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Block-diagonal causal mask of packed rows: ``segments`` [B, kv_len] (0 = padding)."""
    neg = torch.finfo(dtype).min
    segments = segments[:, :kv_len].to(device)
    qi = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
    ki = torch.arange(kv_len, device=device)[None, :]
    q_seg = segments[:, kv_len - q_len :]
    same = (q_seg[:, :, None] == segments[:, None, :]) & (segments[:, None, :] > 0)
    # A padding query sees itself only, so its row is never all masked.
    allowed = ((ki <= qi)[None] & same) | ((ki == qi)[None] & (q_seg[:, :, None] == 0))
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill(~allowed, neg)[:, None]


def varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Bidirectional attention within segments of a packed sequence.

    q/k/v ``[N, H, D]`` hold consecutive segments whose boundaries are ``cu_seqlens`` (``[S + 1]``,
    starting at 0); tokens attend only inside their own segment (audio windows, vision windows,
    one image per segment). Segments are padded into a batch so one SDPA call runs them all.
    """
    bounds = cu_seqlens.tolist()
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    n, heads, dim = q.shape
    if len(lengths) == 1:
        # One segment (a whole image in a full-attention layer): SDPA needs the batch dimension to pick a
        # fused kernel; given 3-D tensors it falls back to the math path, which materialises the N x N
        # scores (a 2000x2000 image: ~20k patches, gigabytes per head on the CPU).
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], scale=scale
        )
        return out[0].transpose(0, 1)
    longest = max(lengths)
    if all(length == longest for length in lengths):
        shape = (len(lengths), longest, heads, dim)
        out = F.scaled_dot_product_attention(
            q.reshape(shape).transpose(1, 2), k.reshape(shape).transpose(1, 2), v.reshape(shape).transpose(1, 2),
            scale=scale,
        )
        return out.transpose(1, 2).reshape(n, heads, dim)
    device = q.device
    lens = torch.tensor(lengths, device=device)
    segment = torch.repeat_interleave(torch.arange(len(lengths), device=device), lens)
    offsets = torch.cumsum(lens, 0) - lens
    slot = torch.arange(n, device=device) - offsets[segment]

    def pack(x: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros(len(lengths), longest, heads, dim)
        out[segment, slot] = x
        return out.transpose(1, 2)

    valid = torch.arange(longest, device=device)[None, :] < lens[:, None]
    mask = torch.zeros(valid.shape, dtype=q.dtype, device=device).masked_fill(~valid, torch.finfo(q.dtype).min)
    out = F.scaled_dot_product_attention(pack(q), pack(k), pack(v), attn_mask=mask[:, None, None, :], scale=scale)
    return out.transpose(1, 2)[segment, slot]
