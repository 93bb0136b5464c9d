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
    """q [B, H, Tq, D], k/v [B, Hkv, Tk, D] (H a multiple of Hkv) -> [B, H, Tq, D].

    ``mask`` is additive (0 / large negative) and broadcast to [B, H, Tq, Tk].
    """
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    # SDPA's is_causal aligns the mask top-left; it is only right when queries and keys coincide.
    causal = is_causal and mask is None and q.shape[-2] == k.shape[-2] and q.shape[-2] > 1
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)


def padding_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, Tk] 1/0 -> additive [B, 1, 1, Tk]."""
    neg = torch.finfo(dtype).min
    return ((1.0 - attention_mask[:, None, None, :].to(dtype)) * neg).to(dtype)


def causal_mask(
    q_len: int,
    kv_len: int,
    attention_mask: torch.Tensor | None,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor | None:
    """Additive mask for ``q_len`` new queries that sit at the end of ``kv_len`` keys.

    Returns None when plain causal attention (or no mask at all, for a single query) is exact,
    so SDPA can take its fastest path. Rows of left padding get a finite mask (never all -inf),
    so they produce finite garbage instead of NaNs that could leak through later layers.
    """
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None
    if attention_mask is None and (q_len == kv_len or q_len == 1):
        return None
    neg = torch.finfo(dtype).min
    offset = kv_len - q_len
    qi = torch.arange(q_len, device=device)[:, None] + offset
    ki = torch.arange(kv_len, device=device)[None, :]
    allowed = (ki <= qi)[None, None]  # [1, 1, Tq, Tk]
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :kv_len].bool()
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill(~allowed, neg)


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
