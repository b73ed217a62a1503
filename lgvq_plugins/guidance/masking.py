"""Which caption tokens to hide for masked text prediction.

Random draws are made on the CPU (with ``generator`` or torch's global RNG), so the same
seed gives the same masks whatever device the captions live on, and rank-local captions
under DDP still share the per-batch ratio when the ranks are seeded alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lgvq_plugins.interfaces import TextTokens


@dataclass(frozen=True)
class MaskingRule:
    """How many caption tokens to hide: one ratio per batch drawn from a normal N(mean, std)
    *truncated* to [low, high] (conditioned on lying there, not clipped), then each eligible
    token (not special, not padding) is hidden with that probability.

    This is the reference's rule (scipy ``truncnorm`` with mean 0.5, std 0.1 on [0.1, 0.3]):
    since the interval lies 2–4 std below the mean, draws pile up towards 0.3 but spread
    over the whole interval — mean ≈ 0.263, median ≈ 0.272, only ≈ 2 % of draws ≥ 0.299 and
    ≈ 6 % below 0.2.

    Args:
        mean, std, low, high: the truncated normal (``mtp.mask_ratio_*`` in gin).
        min_one: when no eligible token of the batch was hidden, hide the one with the
            lowest random score, so the loss is never an empty mean. The reference has no
            such rule (its loss is then 0 for that batch); ``guidance/reference.gin`` turns
            it off.
    """

    mean: float = 0.5
    std: float = 0.1
    low: float = 0.1
    high: float = 0.3
    min_one: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.low <= self.high <= 1.0:
            raise ValueError(f"masking ratio bounds must satisfy 0 <= low <= high <= 1, got "
                             f"low={self.low}, high={self.high} (mtp.mask_ratio_low / mtp.mask_ratio_high)")
        if self.std < 0:
            raise ValueError(f"masking ratio std must be >= 0, got {self.std} (mtp.mask_ratio_std)")

    def sample_ratio(self, generator: torch.Generator | None = None) -> float:
        """Draw this batch's masking probability from the truncated normal."""
        if self.std == 0 or self.low == self.high:  # degenerate: the mean, kept inside the bounds
            return float(min(max(self.mean, self.low), self.high))
        # Inverse-CDF sampling (exact truncation, one uniform draw per ratio); the result is
        # clamped to [low, high] by torch, which only matters for rounding far in a tail.
        draw = torch.empty((), dtype=torch.float64)
        nn.init.trunc_normal_(draw, mean=self.mean, std=self.std, a=self.low, b=self.high,
                              generator=generator)
        return float(draw)


def eligible_tokens(tokens: TextTokens) -> Tensor:
    """(B, L) bool: tokens that may be masked — real (within ``lengths``) and not special."""
    return ~tokens.special_mask & ~tokens.padding_mask


def sample_mlm_mask(tokens: TextTokens, rule: MaskingRule = MaskingRule(),
                    generator: torch.Generator | None = None) -> tuple[Tensor, float]:
    """Mask caption tokens by ``rule``; with ``rule.min_one`` at least one token of the batch
    is masked (when any is eligible), so the loss is never an empty mean.

    Returns:
        ``(mask, ratio)``: (B, L) bool on the tokens' device, and the ratio drawn.
    """
    eligible = eligible_tokens(tokens).cpu()
    ratio = rule.sample_ratio(generator)
    scores = torch.rand(eligible.shape, generator=generator)
    mask = (scores < ratio) & eligible
    if rule.min_one and not bool(mask.any()) and bool(eligible.any()):
        # Promote the eligible token with the lowest score: as random as the rest.
        flat = torch.where(eligible, scores, torch.full_like(scores, float("inf"))).flatten()
        mask.view(-1)[flat.argmin()] = True
    return mask.to(tokens.ids.device), ratio


def mask_k_per_caption(tokens: TextTokens, k: int, generator: torch.Generator | None = None) -> Tensor:
    """(B, L) bool mask hiding exactly ``min(k, #eligible)`` random tokens of each caption
    (the "Mask-1" / "Mask-3" masked-word-prediction evaluation)."""
    if k < 1:
        raise ValueError(f"number of words to mask must be >= 1, got {k}")
    eligible = eligible_tokens(tokens).cpu()
    scores = torch.rand(eligible.shape, generator=generator)
    scores = torch.where(eligible, scores, torch.full_like(scores, float("inf")))
    k_eff = min(k, eligible.shape[1])
    idx = scores.topk(k_eff, dim=1, largest=False).indices  # (B, k)
    mask = torch.zeros_like(eligible)
    mask.scatter_(1, idx, True)
    return (mask & eligible).to(tokens.ids.device)


__all__ = ["MaskingRule", "eligible_tokens", "mask_k_per_caption", "sample_mlm_mask"]
