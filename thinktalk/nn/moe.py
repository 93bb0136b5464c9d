"""Mixture-of-experts feed-forward of the Qwen3-MoE decoders (Thinker: 128 experts top-8; Talker: + shared expert).

Routing (as the checkpoints were trained, and as the reference computes it): softmax over all
experts in float32, keep the top-k probabilities, renormalise them to sum to one when
``norm_topk_prob``, cast to the activation dtype.

The experts are stored stacked — ``gate_up_proj [E, 2I, H]`` (gate rows, then up rows) and
``down_proj [E, H, I]`` — so the expert computation is a few batched matrix products, never a
Python loop over experts:

* ``gather``: for a handful of token copies (decoding: at most E), the chosen experts' weights are
  gathered and multiplied with one ``bmm`` — it reads only the experts in use, sorts nothing;
* ``grouped``: token copies sorted by expert, one grouped GEMM per projection
  (``torch.nn.functional.grouped_mm``; CPU float32 and CUDA bfloat16);
* ``padded``: everywhere else, copies are packed per expert into a padded ``[E, C, H]`` block (one ``bmm``).

All three give the same result (tests compare them); the checkpoint stores one tensor per expert
and ``WEIGHT_MAPS["qwen3_omni_moe"]`` stacks them at load time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from thinktalk.nn.mlp import GatedMLP, activation


def route(
    hidden: torch.Tensor, gate_weight: torch.Tensor, top_k: int, normalize: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden [N, H], router weight [E, H] → (router logits [N, E], weights [N, k], expert ids [N, k]).

    >>> w = torch.eye(3)
    >>> route(torch.tensor([[2.0, 1.0, 0.0]]), w, top_k=2, normalize=True)[2]
    tensor([[0, 1]])
    """
    logits = F.linear(hidden, gate_weight)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return logits, weights.to(logits.dtype), experts


# torch >= 2.10 has the public name; 2.8/2.9 only the private op (same semantics).
_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _grouped_mm_ok(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    if _grouped_mm is None:
        return False
    if x.device.type == "cuda":
        ok_dtype = x.dtype == torch.bfloat16
    else:
        ok_dtype = x.dtype == torch.float32
    # The kernels want every row stride a multiple of 16 bytes.
    aligned = all((w.shape[-1] * w.element_size()) % 16 == 0 and (w.shape[-2] * w.element_size()) % 16 == 0 for w in weights)
    return ok_dtype and aligned


class Experts(nn.Module):
    """E SwiGLU experts with stacked weights."""

    def __init__(self, num_experts: int, dim: int, hidden: int, act: str = "silu"):
        super().__init__()
        self.num_experts, self.hidden = num_experts, hidden
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * hidden, dim))
        self.down_proj = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.act, self.act_name = activation(act), act
        self.impl = "auto"  # "auto" | "grouped" | "gather" | "padded" (tests pin one to compare them)

    def _swiglu(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.split(self.hidden, dim=-1)
        return self.act(gate) * up

    def forward(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """x [N, H], weights/experts [N, k] → Σ_k weight · expert(x) [N, H]."""
        return self.compute(x, weights, experts, self.gate_up_proj, self.down_proj, self.num_experts)

    def compute(
        self,
        x: torch.Tensor,
        weights: torch.Tensor,
        experts: torch.Tensor,
        gate_up_proj: torch.Tensor,
        down_proj: torch.Tensor,
        num_experts: int,
    ) -> torch.Tensor:
        """The experts' computation with the given stacked weights (ids in ``experts`` index them)."""
        n, k = experts.shape
        impl = self.impl
        if impl == "auto":
            if n * k <= num_experts:
                impl = "gather"  # decoding: read only the experts in use, no sorting
            elif _grouped_mm_ok(x, gate_up_proj, down_proj):
                impl = "grouped"
            else:
                impl = "padded"
        flat_expert = experts.reshape(-1)
        if impl == "gather":
            xs = x.repeat_interleave(k, dim=0)
            h = torch.bmm(gate_up_proj[flat_expert], xs[:, :, None])[:, :, 0]
            y = torch.bmm(down_proj[flat_expert], self._swiglu(h)[:, :, None])[:, :, 0]
            y = y * weights.reshape(-1, 1)
            return y.view(n, k, -1).sum(1).to(x.dtype)
        order = torch.argsort(flat_expert, stable=True)
        sorted_expert = flat_expert[order]
        xs = x[order // k]
        # Where each expert's copies end in the sorted order (no device-to-host sync, unlike bincount).
        ends = torch.searchsorted(sorted_expert, torch.arange(1, num_experts + 1, device=x.device))
        if impl == "grouped":
            offs = ends.to(torch.int32)
            h = _grouped_mm(xs, gate_up_proj.transpose(1, 2), offs=offs)
            y = _grouped_mm(self._swiglu(h), down_proj.transpose(1, 2), offs=offs)
        else:
            counts = torch.diff(ends, prepend=ends.new_zeros(1))
            slot = torch.arange(n * k, device=x.device) - (ends - counts)[sorted_expert]
            packed = x.new_zeros(num_experts, int(counts.max()), x.shape[-1])
            packed[sorted_expert, slot] = xs
            h = torch.bmm(packed, gate_up_proj.transpose(1, 2))
            y = torch.bmm(self._swiglu(h), down_proj.transpose(1, 2))[sorted_expert, slot]
        y = y * weights.reshape(-1)[order, None]
        # Back to (token, k) order, then the k weighted expert outputs of every token are summed
        # (a plain reduction: deterministic, no atomics).
        unsorted = torch.empty_like(y)
        unsorted[order] = y
        return unsorted.view(n, k, -1).sum(1).to(x.dtype)


class SparseMoE(nn.Module):
    """Router + experts (+ a sigmoid-gated shared expert when ``shared_hidden`` > 0: the Talker's)."""

    def __init__(
        self, dim: int, hidden: int, num_experts: int, top_k: int, normalize: bool, act: str = "silu", shared_hidden: int = 0
    ):
        super().__init__()
        self.top_k, self.normalize = top_k, normalize
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.experts = Experts(num_experts, dim, hidden, act)
        self.shared_expert = GatedMLP(dim, shared_hidden, act) if shared_hidden else None
        self.shared_expert_gate = nn.Linear(dim, 1, bias=False) if shared_hidden else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        _, weights, experts = route(flat, self.gate.weight, self.top_k, self.normalize)
        out = self.experts(flat, weights, experts)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)
        return out.reshape(shape)
