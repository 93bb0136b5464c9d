"""Residual vector quantizer with EMA (online k-means) codebooks, for the project's own codec.

Level k quantizes what levels 0..k-1 left over: r_0 = z, i_k = argmin_j ||r_k - c_k[j]||, r_{k+1} = r_k - c_k[i_k];
the quantized vector is sum_k c_k[i_k] and reaches the decoder by the straight-through estimator (its
forward value is exactly the sum of the chosen codewords; its gradient is the identity to ``z``).

The codebooks are not trained by gradient. As in VQ-VAE-2 and SoundStream, each one tracks the
exponential moving average of the vectors assigned to each code (counts ``cluster_size`` and sums
``embed_avg``, Laplace-smoothed), which is online k-means. Around that:

* **k-means init** on the first training batch (a few Lloyd iterations from random batch vectors),
* **commitment loss** mean_k ||r_k - sg(c_k[i_k])||² pulls the encoder towards its codes,
* **dead-code restarts**: a code whose EMA count falls under ``dead_code_threshold`` times the mean count
  (batch vectors / codes) is moved onto a random vector of the current batch and given the mean count,
  so it has a few hundred steps (at decay 0.99) to be chosen before it is moved again.

All randomness (init and restarts) draws from torch's global generator, which training checkpoints save,
so a resumed run restarts exactly the codes an uninterrupted one would. Single process: the EMA
statistics are not all-reduced across data-parallel ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class QuantizerOutput:
    quantized: torch.Tensor  # [B, T, D] straight-through: forward value sum_k c_k[i_k], gradient to z
    codes: torch.Tensor  # [B, G, T] int64
    commitment: torch.Tensor  # scalar, mean over levels of ||r_k - sg(q_k)||²
    perplexity: torch.Tensor  # [G] exp(entropy) of each level's code usage in this batch
    restarted: int  # dead codes moved onto batch vectors in this call (training only)


def nearest_code(x: torch.Tensor, embed: torch.Tensor) -> torch.Tensor:
    """x [M, D], embed [N, D] → index of the nearest code [M] (squared Euclidean distance)."""
    dist = x.pow(2).sum(-1, keepdim=True) - 2 * x @ embed.t() + embed.pow(2).sum(-1)[None]
    return dist.argmin(dim=-1)


class EMACodebook(nn.Module):
    """One level: ``embed`` [N, D] (the codes), ``embed_avg`` / ``cluster_size`` (their EMA statistics)."""

    def __init__(self, size: int, dim: int, decay: float, epsilon: float):
        super().__init__()
        self.size, self.decay, self.epsilon = size, decay, epsilon
        self.register_buffer("embed", torch.zeros(size, dim))
        self.register_buffer("embed_avg", torch.zeros(size, dim))
        self.register_buffer("cluster_size", torch.zeros(size))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def kmeans_init(self, x: torch.Tensor, iters: int) -> None:
        """Lloyd's k-means on the batch vectors ``x`` [M, D], from ``size`` of them drawn at random."""
        pick = torch.randint(0, x.shape[0], (self.size,)).to(x.device)
        centroids = x[pick].clone()
        counts = torch.zeros(self.size, device=x.device)
        for _ in range(max(1, iters)):
            onehot = F.one_hot(nearest_code(x, centroids), self.size).to(x.dtype)
            counts = onehot.sum(0)
            sums = onehot.t() @ x
            filled = counts > 0
            centroids[filled] = sums[filled] / counts[filled, None]
        self.embed.copy_(centroids)
        self.cluster_size.copy_(counts)
        self.embed_avg.copy_(centroids * counts[:, None])
        self.initialized.fill_(True)

    @torch.no_grad()
    def ema_update(self, x: torch.Tensor, idx: torch.Tensor) -> None:
        # One-hot products rather than index_add_: deterministic on every device (resume must replay exactly).
        onehot = F.one_hot(idx, self.size).to(x.dtype)
        self.cluster_size.mul_(self.decay).add_(onehot.sum(0), alpha=1 - self.decay)
        self.embed_avg.mul_(self.decay).add_(onehot.t() @ x, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.epsilon) / (n + self.size * self.epsilon) * n
        self.embed.copy_(self.embed_avg / smoothed[:, None])

    @torch.no_grad()
    def restart_dead(self, x: torch.Tensor, threshold: float) -> int:
        """Move codes used less than ``threshold`` × the mean (EMA) count onto random rows of ``x`` [M, D]."""
        mean_count = x.shape[0] / self.size
        dead = self.cluster_size < threshold * mean_count
        n = int(dead.sum())
        if n == 0:
            return 0
        samples = x[torch.randint(0, x.shape[0], (n,)).to(x.device)]
        self.embed[dead] = samples
        self.cluster_size[dead] = mean_count
        self.embed_avg[dead] = samples * mean_count
        return n


class ResidualVectorQuantizer(nn.Module):
    def __init__(self, dim: int, levels: int, codebook_size: int, decay: float = 0.99, epsilon: float = 1e-5,
                 kmeans_iters: int = 10, dead_code_threshold: float = 0.1):
        super().__init__()
        self.levels = nn.ModuleList(EMACodebook(codebook_size, dim, decay, epsilon) for _ in range(levels))
        self.kmeans_iters, self.dead_code_threshold = kmeans_iters, dead_code_threshold

    @property
    def num_levels(self) -> int:
        return len(self.levels)

    def forward(self, z: torch.Tensor, update: bool | None = None) -> QuantizerOutput:
        """z [B, T, D] → :class:`QuantizerOutput`; codebooks are updated when ``update`` (default: training)."""
        update = self.training if update is None else update
        b, t, d = z.shape
        residual = z
        quantized = torch.zeros_like(z)
        codes, perplexity, commitment, restarted = [], [], z.new_zeros(()), 0
        for level in self.levels:
            flat = residual.detach().reshape(-1, d)
            if update and not bool(level.initialized):
                level.kmeans_init(flat, self.kmeans_iters)
            idx = nearest_code(flat, level.embed)
            q = F.embedding(idx, level.embed).view(b, t, d)  # a copy: the EMA update below does not change it
            if update:
                level.ema_update(flat, idx)
                restarted += level.restart_dead(flat, self.dead_code_threshold)
            commitment = commitment + F.mse_loss(residual, q)
            quantized = quantized + q
            residual = residual - q
            codes.append(idx.view(b, t))
            p = torch.bincount(idx, minlength=level.size).float() / idx.numel()
            perplexity.append(torch.exp(-(p * torch.log(p.clamp_min(1e-10))).sum()))
        return QuantizerOutput(
            quantized=z + (quantized - z).detach(),
            codes=torch.stack(codes, dim=1),
            commitment=commitment / len(self.levels),
            perplexity=torch.stack(perplexity),
            restarted=restarted,
        )

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, G, T] → sum of the chosen codewords [B, T, D]."""
        return sum(F.embedding(codes[:, k], level.embed) for k, level in enumerate(self.levels))

    @torch.no_grad()
    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, T, D] → codes [B, G, T] (no codebook update)."""
        return self.forward(z, update=False).codes
