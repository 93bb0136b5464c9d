"""KV cache: preallocated per-layer buffers owned by a generation state, passed into the model.

Every row of the batch has its own fill level, so rows may be at different places — the engine
keeps many conversations in one cache, each in its own rows — and every slot knows whether it may be
attended (``valid``: left padding and unwritten slots may not). A forward pass of ``T`` new tokens
first *reserves* their slots (:meth:`KVCache.reserve`: ``lengths[b] .. lengths[b] + T`` of every
active row), then each layer writes its keys/values there (:meth:`KVCache.write`, an ``index_put``
at slot tensors) and attends to the buffer. Rows that are not active (the exec mask) write into a
spare slot past the end that is never valid, so a batched step leaves their contents untouched.

The fill levels are kept twice: on the device (``lengths``, what the write indices come from) and on
the host (``host_lengths``, a numpy array the caller updates through :meth:`reserve` without asking
the device). :meth:`rows` gives a view of some rows that shares both.

Two ways to attend, both tested equal:

- the plain path attends to ``[:max_length]`` (the longest row), with no mask at all when every row is
  full up to there;
- ``full=True`` attends to the whole static buffer with a mask built from tensors only, so the step
  has fixed shapes and no host synchronisation — what a captured (CUDA-graph / compiled) decode step
  needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """``torch.zeros``; on the CPU taken from calloc'd memory, whose pages the OS maps in (as zeros) only when
    first written — a server's whole KV pool then costs nothing at start and memory only as conversations use
    it (``torch.zeros`` writes every byte: seconds for a pool of several GiB). The buffers must be zeros, not
    garbage: a masked slot still meets its value in attention (0 · NaN is NaN)."""
    device = torch.device(device)
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return torch.from_numpy(np.zeros(nbytes, dtype=np.uint8)).view(dtype).view(shape)


@dataclass
class KVCache:
    keys: list[torch.Tensor]  # per layer [B, Hkv, max_len + 1, D] (the last slot is the spare one)
    values: list[torch.Tensor]
    lengths: torch.Tensor  # [B] long: slots written per row (the next token of row b goes to slot lengths[b])
    valid: torch.Tensor  # [B, max_len + 1] bool: the slot holds a token that may be attended
    host_lengths: np.ndarray  # [B] int64: the same fill levels, on the host
    host_holes: np.ndarray  # [B] bool: the row has written slots that are not valid (left padding)
    full: bool = False  # attend over the whole buffer with a tensor mask (static shapes, no host sync)
    # Tensor parallel (thinktalk.parallel.Driver): which pool the workers mirror, and this view's first row.
    pool: int | None = None
    row0: int = 0
    # The slots attention reads, ``[:end]`` (set by :meth:`reserve`: the fullest row's level, or every slot when
    # ``full``): a plain int, so a compiled decode step does not read the host fill levels.
    end: int = 0
    _views: dict = field(default_factory=dict, repr=False, compare=False)  # (start, end, full, pool) -> rows view
    KEEP_VIEWS = 32  # row views kept (not a field; each view holds two tensor views per layer)

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
        shape = (batch, kv_heads, max_len + 1, head_dim)
        return cls(
            keys=[zeros(shape, dtype, device) for _ in range(num_layers)],
            values=[zeros(shape, dtype, device) for _ in range(num_layers)],
            lengths=torch.zeros(batch, dtype=torch.long, device=device),
            valid=torch.zeros(batch, max_len + 1, dtype=torch.bool, device=device),
            host_lengths=np.zeros(batch, dtype=np.int64),
            host_holes=np.zeros(batch, dtype=bool),
        )

    @property
    def max_len(self) -> int:
        """Slots per row."""
        return self.keys[0].shape[2] - 1

    @property
    def batch(self) -> int:
        return self.keys[0].shape[0]

    @property
    def max_length(self) -> int:
        """The fill level of the fullest row."""
        return int(self.host_lengths.max()) if self.batch else 0

    @property
    def uniform(self) -> bool:
        """Every row has written the same number of slots."""
        return bool((self.host_lengths == self.host_lengths[0]).all())

    @property
    def holes(self) -> bool:
        return bool(self.host_holes.any())

    @property
    def length(self) -> int:
        """Slots filled in every row (meaningful while ``uniform``)."""
        return self.max_length

    def reserve(
        self, t: int, new_valid: torch.Tensor | None = None, active: list[bool] | np.ndarray | None = None
    ) -> torch.Tensor:
        """Claim the next ``t`` slots of every active row for new tokens; returns their indices ``[B, t]``.

        ``new_valid`` [B, t] (1/True = a real token) marks padding among the new tokens (None: all real).
        ``active`` (host booleans, one per row; None: all rows): inactive rows get the spare slot and keep
        their fill level.
        """
        if active is None and new_valid is None:  # every row, no padding: a decode step's few operations
            need = (int(self.host_lengths.max()) if self.batch else 0) + t
            if need > self.max_len:
                raise self._overflow(need)
            slots = self.lengths[:, None] + torch.arange(t, device=self.lengths.device)
            self.valid.scatter_(1, slots, True)
            self.lengths += t
            self.host_lengths += t
            self.end = self.max_len if self.full else need
            return slots
        act = np.ones(self.batch, dtype=bool) if active is None else np.asarray(active, dtype=bool)
        need = int(self.host_lengths[act].max()) + t if act.any() else 0
        if need > self.max_len:
            raise self._overflow(need)
        device = self.lengths.device
        slots = self.lengths[:, None] + torch.arange(t, device=device)
        valid = torch.ones(self.batch, t, dtype=torch.bool, device=device) if new_valid is None else new_valid.to(
            device=device, dtype=torch.bool)  # fmt: skip
        if new_valid is not None:
            # One check per prefill (decode steps pass no mask), so the plain path knows whether to mask.
            self.host_holes |= act & ~new_valid.bool().all(dim=1).cpu().numpy()
        if not act.all():
            act_t = torch.from_numpy(act).to(device)
            slots = torch.where(act_t[:, None], slots, torch.full_like(slots, self.max_len))
            valid = valid & act_t[:, None]
            self.lengths += t * act_t
        else:
            self.lengths += t
        rows = torch.arange(self.batch, device=device)[:, None]
        self.valid[rows, slots] = valid
        self.host_lengths += t * act
        self.end = self.max_len if self.full else self.max_length
        return slots

    def _overflow(self, need: int) -> RuntimeError:
        return RuntimeError(
            f"KV cache overflow: {need} positions needed, {self.max_len} allocated "
            "(raise max_new_tokens / the cache length when the state is created)"
        )

    def write(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys/values ``[B, Hkv, t, D]`` of ``layer`` at ``slots`` [B, t]; return what attention reads."""
        rows = torch.arange(k.shape[0], device=slots.device)[:, None]
        self.keys[layer][rows, :, slots] = k.transpose(1, 2).to(self.keys[layer].dtype)
        self.values[layer][rows, :, slots] = v.transpose(1, 2).to(self.values[layer].dtype)
        return self.keys[layer][:, :, : self.end], self.values[layer][:, :, : self.end]

    def attention_mask(self, slots: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor | None, bool]:
        """(additive mask [B, 1, t, K] or None, is_causal) for queries at ``slots`` (after :meth:`reserve`).

        A query attends to valid slots at or before its own. Without holes, with all rows level and
        not ``full``, plain causal attention (or none, for one query) is exact and SDPA takes its
        fastest path. Rows whose queries see no valid slot (left padding, inactive rows) get a finite
        mask, so they produce finite garbage rather than NaNs that would leak through the cache.
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

    def reset(self, rows: slice | None = None) -> None:
        """Empty every row (or ``rows``); the buffers stay allocated."""
        rows = slice(None) if rows is None else rows
        self.lengths[rows] = 0
        self.valid[rows] = False
        self.host_lengths[rows] = 0
        self.host_holes[rows] = False

    def rows(self, start: int, end: int) -> KVCache:
        """The cache of rows ``[start, end)``: views of this one's buffers and fill levels (writes go through).
        Made once per rows (an engine asks for the same rows every step)."""
        key = (start, end, self.full, self.pool)
        view = self._views.pop(key, None)
        if view is None:
            view = self._view(start, end)
            if len(self._views) >= self.KEEP_VIEWS:  # a bounded few: the least recently asked for go
                del self._views[next(iter(self._views))]
        self._views[key] = view  # the most recent last
        return view

    def _view(self, start: int, end: int) -> KVCache:
        return KVCache(
            keys=[k[start:end] for k in self.keys],
            values=[v[start:end] for v in self.values],
            lengths=self.lengths[start:end],
            valid=self.valid[start:end],
            host_lengths=self.host_lengths[start:end],
            host_holes=self.host_holes[start:end],
            full=self.full,
            pool=self.pool,
            row0=self.row0 + start,
            end=self.end,
        )
