"""KV cache: preallocated per-layer buffers owned by a generation state, passed into the model.

Every row of the batch has its own fill level (``lengths``), so rows may be at different places — a
batch built from conversations that started at different times — and every slot knows whether it
may be attended (``valid``: left padding and unwritten slots may not). A forward pass of ``T`` new
tokens first *reserves* their slots (:meth:`KVCache.reserve`: ``lengths[b] .. lengths[b] + T`` of
every row), then each layer writes its keys/values there (:meth:`KVCache.write`, an ``index_put``
at slot tensors: no Python integer from the device) and attends to the buffer.

Two ways to attend, both tested equal:

- the plain path attends to ``[:max_length]`` (a host-side upper bound of the fill levels that the
  caller knows without asking the device), with no mask at all when every row is full up to there;
- ``full=True`` attends to the whole static buffer with a mask built from tensors only, so the step
  has fixed shapes and no host synchronisation — what a captured (CUDA-graph / compiled) decode step
  needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KVCache:
    keys: list[torch.Tensor]  # per layer [B, Hkv, max_len, D]
    values: list[torch.Tensor]
    lengths: torch.Tensor  # [B] long: slots written per row (the next token of row b goes to slot lengths[b])
    valid: torch.Tensor  # [B, max_len] bool: the slot holds a token that may be attended
    max_length: int = 0  # host-side upper bound of ``lengths`` (equal to every length while ``uniform``)
    uniform: bool = True  # every row has written the same number of slots
    holes: bool = False  # some written slot is not valid (left padding): attention needs a mask
    full: bool = False  # attend over the whole buffer with a tensor mask (static shapes, no host sync)

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
            lengths=torch.zeros(batch, dtype=torch.long, device=device),
            valid=torch.zeros(batch, max_len, dtype=torch.bool, device=device),
        )

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]

    @property
    def batch(self) -> int:
        return self.keys[0].shape[0]

    @property
    def length(self) -> int:
        """Slots filled in every row (only meaningful while ``uniform``)."""
        return self.max_length

    def reserve(self, t: int, new_valid: torch.Tensor | None = None) -> torch.Tensor:
        """Claim the next ``t`` slots of every row for new tokens; returns their indices ``[B, t]``.

        ``new_valid`` [B, t] (1/True = a real token) marks padding among the new tokens; None: all real.
        """
        if self.max_length + t > self.max_len:
            raise RuntimeError(
                f"KV cache overflow: {self.max_length + t} positions needed, {self.max_len} allocated "
                "(raise max_new_tokens / the cache length when the state is created)"
            )
        slots = self.lengths[:, None] + torch.arange(t, device=self.lengths.device)
        rows = torch.arange(self.batch, device=self.lengths.device)[:, None]
        if new_valid is None:
            self.valid[rows, slots] = True
        else:
            self.valid[rows, slots] = new_valid.to(device=self.valid.device, dtype=torch.bool)
            # One check per prefill (decode steps pass no mask), so the plain path knows whether to mask.
            self.holes = self.holes or not bool(new_valid.all())
        self.lengths += t
        self.max_length += t
        return slots

    def write(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys/values ``[B, Hkv, t, D]`` of ``layer`` at ``slots`` [B, t]; return what attention reads."""
        rows = torch.arange(k.shape[0], device=slots.device)[:, None]
        self.keys[layer][rows, :, slots] = k.transpose(1, 2).to(self.keys[layer].dtype)
        self.values[layer][rows, :, slots] = v.transpose(1, 2).to(self.values[layer].dtype)
        end = self.max_len if self.full else self.max_length
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def attention_mask(self, slots: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor | None, bool]:
        """(additive mask [B, 1, t, K] or None, is_causal) for queries at ``slots`` (after :meth:`reserve`).

        A query attends to valid slots at or before its own. Without holes, with all rows level and
        not ``full``, plain causal attention (or none, for one query) is exact and SDPA takes its
        fastest path. Rows whose queries see no valid slot (left padding) get a finite mask, so they
        produce finite garbage rather than NaNs that would leak into later layers through the cache.
        """
        t = slots.shape[1]
        if not self.full and self.uniform and not self.holes:
            if self.max_length == t:
                return None, True
            if t == 1:
                return None, False
        end = self.max_len if self.full else self.max_length
        k = torch.arange(end, device=slots.device)
        allowed = self.valid[:, None, :end] & (k[None, None, :] <= slots[:, :, None])
        mask = torch.zeros(allowed.shape, dtype=dtype, device=slots.device)
        return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None], False

    def reset(self, rows: torch.Tensor | None = None) -> None:
        """Empty every row (or the rows where ``rows`` [B] bool is set); the buffers stay allocated."""
        if rows is None:
            self.lengths.zero_()
            self.valid.zero_()
            self.max_length, self.uniform, self.holes = 0, True, False
            return
        self.lengths.masked_fill_(rows, 0)
        self.valid.masked_fill_(rows[:, None], False)
        self.uniform = False
