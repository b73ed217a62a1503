"""Which caption tokens to hide for masked text prediction.

Random draws are made on the CPU (with ``generator`` or torch's global RNG), so the same
seed gives the same masks whatever device the captions live on, and rank-local captions
under DDP still share the per-batch ratio when the ranks are seeded alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lgvq_plugins.interfaces import TextTokens


@dataclass(frozen=True)
class MaskingRule:
    """The reference rule: one ratio per batch ~ N(mean, std), clipped to [low, high]; each
    eligible token (not special, not padding) is then hidden with that probability.

    The reference's numbers (mean 0.5, clipped to at most 0.3) make the ratio 0.3 almost
    always; they are kept as defaults for faithfulness and are gin-settable on ``mtp``.
    """

    mean: float = 0.5
    std: float = 0.1
    low: float = 0.1
    high: float = 0.3

    def __post_init__(self) -> None:
        if not 0.0 <= self.low <= self.high <= 1.0:
            raise ValueError(f"masking ratio bounds must satisfy 0 <= low <= high <= 1, got "
                             f"low={self.low}, high={self.high} (mtp.mask_ratio_low / mtp.mask_ratio_high)")
        if self.std < 0:
            raise ValueError(f"masking ratio std must be >= 0, got {self.std} (mtp.mask_ratio_std)")

    def sample_ratio(self, generator: torch.Generator | None = None) -> float:
        """Draw this batch's masking probability."""
        draw = torch.randn((), generator=generator).item() * self.std + self.mean
        return float(min(max(draw, self.low), self.high))


def eligible_tokens(tokens: TextTokens) -> Tensor:
    """(B, L) bool: tokens that may be masked — real (within ``lengths``) and not special."""
    return ~tokens.special_mask & ~tokens.padding_mask


def sample_mlm_mask(tokens: TextTokens, rule: MaskingRule = MaskingRule(),
                    generator: torch.Generator | None = None) -> tuple[Tensor, float]:
    """Mask caption tokens by ``rule``; at least one token in the batch is always masked
    (when any is eligible), so the loss is never an empty mean.

    Returns:
        ``(mask, ratio)``: (B, L) bool on the tokens' device, and the ratio drawn.
    """
    eligible = eligible_tokens(tokens).cpu()
    ratio = rule.sample_ratio(generator)
    scores = torch.rand(eligible.shape, generator=generator)
    mask = (scores < ratio) & eligible
    if not bool(mask.any()) and bool(eligible.any()):
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


__all__ = ["MaskingRule", "eligible_tokens", "sample_mlm_mask", "mask_k_per_caption"]
