"""KV cache: preallocated per-layer buffers owned by a generation session, passed into the model."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class KVCache:
    """Static key/value buffers ``[B, Hkv, max_len, D]`` per layer and the number of filled positions.

    The model writes the keys/values of its new tokens at ``[length, length + T)`` in every layer
    and then calls :meth:`advance`. Shapes never change while decoding, which is what static-shape
    compilation (CUDA graphs) needs; the plain path simply attends to the filled prefix.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int = 0
    # 1/0 per cached position, [B, max_len]; None when no row has padding.
    attention_mask: torch.Tensor | None = field(default=None)

    @classmethod
    def allocate(
        cls,
        num_layers: int,
        batch: int,
        kv_heads: int,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> KVCache:
        shape = (batch, kv_heads, max_len, head_dim)
        return cls(
            keys=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)],
            values=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)],
        )

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]

    @property
    def batch(self) -> int:
        return self.keys[0].shape[0]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new keys/values of ``layer`` after the filled prefix; return the whole filled part."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise RuntimeError(
                f"KV cache overflow: {end} positions needed, {self.max_len} allocated "
                "(raise max_new_tokens / the cache length when the session is created)"
            )
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def extend_mask(self, new_mask: torch.Tensor | None, new_len: int) -> torch.Tensor | None:
        """Record the padding mask of ``new_len`` new positions; return the mask over all of them."""
        if new_mask is None and self.attention_mask is None:
            return None
        if self.attention_mask is None:
            self.attention_mask = torch.ones(
                self.batch, self.max_len, dtype=torch.long, device=self.keys[0].device
            )
        if new_mask is not None:
            self.attention_mask[:, self.length : self.length + new_len] = new_mask
        else:
            self.attention_mask[:, self.length : self.length + new_len] = 1
        return self.attention_mask[:, : self.length + new_len]

    def advance(self, n: int) -> None:
        self.length += n

    def truncate(self, length: int) -> None:
        """Forget everything after ``length`` (e.g. to roll back a speculative step)."""
        self.length = length

    def select(self, rows: torch.Tensor) -> KVCache:
        """A cache of the given batch rows (copies)."""
        return KVCache(
            keys=[k[rows] for k in self.keys],
            values=[v[rows] for v in self.values],
            length=self.length,
            attention_mask=None if self.attention_mask is None else self.attention_mask[rows],
        )
