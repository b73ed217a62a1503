"""Codebook usage and perplexity: the one implementation.

The quantizers (per-batch ``stats``), the ``codebook_usage`` metric, the report and the
example third-party plugin all describe a code histogram with the same two numbers::

    counts = code_histogram(indices, num_codes)      # (K,) int64
    usage, perplexity = codebook_stats(counts)

* ``usage`` — fraction of the K codes chosen at least once;
* ``perplexity`` — ``exp`` of the entropy (nats) of the code frequencies: K when every code
  is equally used, 1 when one code takes everything (and for an empty histogram).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class CodebookStats(NamedTuple):
    """Detached scalar tensors, float64 for float64 counts, otherwise float32."""

    usage: Tensor
    perplexity: Tensor


def code_histogram(indices: Tensor, num_codes: int, *, validate: bool = True) -> Tensor:
    """(K,) int64 count of each code among ``indices`` (any shape of integer code ids).

    Args:
        validate: check that every index lies in ``[0, num_codes)`` (one device sync);
            quantizers that produce the indices themselves pass ``False``.

    Raises:
        ValueError: an index is out of range (the message gives the range found).
    """
    flat = indices.detach().reshape(-1).long()
    if validate and flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= num_codes):
        raise ValueError(f"code indices outside [0, {num_codes}) (min {int(flat.min())}, "
                         f"max {int(flat.max())}); is num_codes right?")
    return torch.bincount(flat, minlength=num_codes)


def codebook_stats(counts: Tensor) -> CodebookStats:
    """``(usage, perplexity)`` of a (K,) histogram (counts, or any non-negative weights)."""
    counts = counts.detach()
    counts = counts.double() if counts.dtype == torch.float64 else counts.float()
    total = counts.sum()
    probs = counts / total.clamp_min(torch.finfo(counts.dtype).tiny)
    entropy = -torch.special.xlogy(probs, probs).sum()  # 0·log 0 = 0 exactly: no clamping
    return CodebookStats(usage=(counts > 0).to(counts.dtype).mean(), perplexity=entropy.exp())
