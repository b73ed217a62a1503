"""Filtering of next-token logits: temperature, top-k and top-p (nucleus), vectorised.

``top_k = 1`` keeps only the arg-max, so sampling is then deterministic (no randomness is
drawn that could change the outcome).
"""

from __future__ import annotations

import torch
from torch import Tensor


def filter_logits(logits: Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> Tensor:
    """Logits (B, V) scaled by ``1/temperature`` with everything outside the top-k and the
    top-p nucleus set to ``-inf``.

    Args:
        temperature: > 0; below 1 sharpens, above 1 flattens.
        top_k: keep the ``top_k`` largest logits (None or 0: all). Ties at the k-th value are
            kept, as in taming/HF.
        top_p: keep the smallest set of largest-probability tokens whose mass reaches
            ``top_p`` (None or 1: all); the most likely token is always kept.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}; use top_k=1 for greedy decoding")
    logits = logits.float() / float(temperature)
    if top_k:
        k = min(int(top_k), logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # mass strictly before each token: a token is dropped once that mass reaches top_p,
        # so the first token (mass before = 0) always stays.
        before = probs.cumsum(-1) - probs
        drop_sorted = before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> Tensor:
    """One token per row (B,) drawn from the filtered distribution of ``logits`` (B, V).

    With ``top_k = 1`` the arg-max is returned without drawing (deterministic)."""
    if top_k == 1:
        return logits.argmax(-1)
    probs = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


__all__ = ["filter_logits", "sample_next"]
