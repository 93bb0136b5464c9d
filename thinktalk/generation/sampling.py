"""Next-token choice: greedy, or sampling with repetition penalty, temperature, top-k and top-p.

The processors run in the reference's order (repetition penalty → suppression → temperature →
top-k → top-p), so the same settings give the same distribution as transformers' ``generate``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    suppress_tokens: tuple[int, ...] = ()

    def __post_init__(self):
        if self.temperature <= 0 and self.do_sample:
            raise ValueError(f"temperature must be > 0 when sampling (got {self.temperature})")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (got {self.top_p})")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (got {self.top_k})")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (got {self.repetition_penalty})")


def apply_repetition_penalty(logits: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """Divide positive / multiply negative logits of every token already in ``history`` [B, L]."""
    if penalty == 1.0 or history.numel() == 0:
        return logits
    picked = logits.gather(1, history)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return logits.scatter(1, history, picked)


def process_logits(logits: torch.Tensor, history: torch.Tensor | None, p: SamplingParams) -> torch.Tensor:
    """logits [B, V] (float32) → processed logits (masked entries -inf)."""
    logits = logits.float()
    if history is not None:
        logits = apply_repetition_penalty(logits, history, p.repetition_penalty)
    if p.suppress_tokens:
        logits[:, list(p.suppress_tokens)] = -float("inf")
    if not p.do_sample:
        return logits
    if p.temperature != 1.0:
        logits = logits / p.temperature
    if p.top_k > 0:
        k = min(p.top_k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum <= 1 - p.top_p
        remove[:, -1] = False  # always keep the most likely token
        logits = logits.masked_fill(remove.scatter(1, order, remove), -float("inf"))
    return logits


def choose(
    logits: torch.Tensor, history: torch.Tensor | None, p: SamplingParams, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The next token of every row, [B]."""
    logits = process_logits(logits, history, p)
    if not p.do_sample:
        return logits.argmax(-1)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
