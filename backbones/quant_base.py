"""Shared plumbing of the built-in codebook quantizers (``vq`` and ``cvq``).

* layout: (B, D, *grid) latents ↔ (N, D) rows, and back;
* batch statistics (``perplexity``, ``usage``) from code counts, which the quantizers
  all-reduce in training so that under DDP they describe the global batch;
* a running usage histogram for evaluation (``reset_usage``, ``usage_histogram``,
  ``usage_fraction``);
* the two VQ loss terms with the taming-style ``legacy`` placement of β.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lgvq_plugins.evaluation.codebook import codebook_stats
from lgvq_plugins.training import distributed


def to_rows(z: Tensor, dim: int, setting: str = "dim") -> tuple[Tensor, tuple[int, ...]]:
    """(B, D, *grid) → (B·prod(grid), D) rows, plus the (B, *grid) shape to restore."""
    if z.dim() < 2 or z.shape[1] != dim:
        raise ValueError(f"expected latents of shape (B, {dim}, h, w) — channel dimension "
                         f"second and equal to the quantizer's {setting}={dim}; got {tuple(z.shape)}. "
                         f"Set the quantizer's {setting} to the encoder's output width.")
    grid = (z.shape[0], *z.shape[2:])
    return z.movedim(1, -1).reshape(-1, dim), grid


def from_rows(rows: Tensor, grid: tuple[int, ...]) -> Tensor:
    """(N, D) rows → (B, D, *grid), contiguous (the decoder's convolutions want it)."""
    return rows.reshape(*grid, rows.shape[-1]).movedim(-1, 1).contiguous()


def vq_loss(x: Tensor, q: Tensor, beta: float, legacy: bool) -> Tensor:
    """Codebook + commitment objective, means over all elements.

    ``legacy=False`` (VQ-VAE paper, taming's default): ``‖sg(x) − q‖² + β·‖x − sg(q)‖²`` —
    β weighs the *commitment* term that moves the encoder.
    ``legacy=True`` (taming's historical ``legacy=True`` path): ``β·‖sg(x) − q‖² + ‖x − sg(q)‖²``
    — β weighs the *codebook* term instead.
    """
    codebook_term = F.mse_loss(q, x.detach())
    commitment_term = F.mse_loss(x, q.detach())
    if legacy:
        return beta * codebook_term + commitment_term
    return codebook_term + beta * commitment_term


def usage_stats(counts: Tensor) -> dict[str, Tensor]:
    """``perplexity`` (exp of the entropy of code frequencies) and ``usage`` (fraction of
    codes hit at least once) from (K,) counts; detached float32 scalars
    (:func:`lgvq_plugins.evaluation.codebook.codebook_stats`)."""
    stats = codebook_stats(counts.float())
    return {"perplexity": stats.perplexity, "usage": stats.usage}


class CodebookQuantizer(nn.Module):
    """Base of the built-in quantizers: usage histogram, stats and the ``config`` record.

    Subclasses set ``self.config`` (their constructor arguments) and implement ``forward``,
    ``embed`` and ``codebook``.
    """

    num_codes: int
    dim: int
    config: dict[str, Any]

    def __init__(self, dim: int, num_codes: int, chunk_size: int):
        super().__init__()
        if dim < 1:
            raise ValueError(f"dim must be a positive latent width, got {dim}")
        if num_codes < 2:
            raise ValueError(f"num_codes must be at least 2, got {num_codes}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size (distance entries per tile) must be positive, got {chunk_size}")
        self.dim, self.num_codes, self.chunk_size = int(dim), int(num_codes), int(chunk_size)
        # Running histogram for evaluation. Not persistent: it is a measurement, not state,
        # so checkpoints neither carry nor require it.
        self.register_buffer("usage_counts", torch.zeros(num_codes, dtype=torch.long), persistent=False)

    # -- usage -------------------------------------------------------------------------
    def reset_usage(self) -> None:
        """Zero the running usage histogram (call before an evaluation pass)."""
        self.usage_counts.zero_()

    @property
    def usage_histogram(self) -> Tensor:
        """(K,) int64 how often each code was chosen since the last :meth:`reset_usage`."""
        return self.usage_counts

    def usage_fraction(self, sync: bool = False) -> float:
        """Fraction of codes chosen at least once since the last :meth:`reset_usage`.

        In training the histogram already counts every rank's codes; in eval mode each rank
        counts its own, and ``sync=True`` sums them first (a collective: call it on all ranks).
        """
        counts = self.usage_counts
        if sync:
            counts = distributed.all_reduce_sum(counts.clone())
        return float((counts > 0).float().mean())

    def _count(self, indices: Tensor, extra: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """(K,) float counts of ``indices`` — summed over ranks in training — and ``extra``
        (K, C) summed over ranks in the same collective. Also feeds the histogram.

        In eval mode nothing is all-reduced: evaluating on one rank must not wait for the
        others, so eval-mode stats describe the local batch.
        """
        counts = torch.bincount(indices, minlength=self.num_codes).float()
        if self.training and distributed.is_distributed():
            if extra is None:
                distributed.all_reduce_sum(counts)
            else:
                packed = distributed.all_reduce_sum(torch.cat([counts[:, None], extra], dim=1))
                counts, extra = packed[:, 0].contiguous(), packed[:, 1:]
        self.usage_counts += counts.round().long()
        return counts, extra

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config.items())
