"""Small, exact score functions used by the evaluation tasks (pure tensor maths).

* :func:`fid_kid_from_features` — FID and KID from two feature sets, through torchmetrics'
  own ``FrechetInceptionDistance`` / ``KernelInceptionDistance`` (the features are fed
  through an identity "extractor", so the numbers are torchmetrics' to the last digit).
* :func:`recall_at_k` — retrieval recall with a set of positives per query.
* :func:`usage_from_counts` — codebook usage, perplexity of a code histogram.
* :func:`similarity_mse_sums` — the code–word similarity error of L_ras, as sums that add
  up over batches and ranks.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lgvq_plugins.evaluation.codebook import codebook_stats


class _Identity(nn.Module):
    """A "feature extractor" that returns its input: lets torchmetrics score given features."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, x: Tensor) -> Tensor:
        return x


def fid_kid_from_features(real: Tensor, fake: Tensor, *, kid_subsets: int = 100,
                          kid_subset_size: int = 1000, seed: int = 0) -> dict[str, float | None]:
    """FID and KID (mean, std) between feature sets ``real`` (N, F) and ``fake`` (M, F).

    KID draws ``kid_subsets`` random subsets of ``min(kid_subset_size, N, M)`` rows with a
    generator seeded by ``seed`` (the result does not depend on the global RNG). KID is
    ``None`` for fewer than 2 rows; FID needs at least 2 rows per set.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    real, fake = real.double().cpu(), fake.double().cpu()
    if real.shape[0] < 2 or fake.shape[0] < 2:
        raise ValueError(f"FID needs at least 2 images per set, got {real.shape[0]} and {fake.shape[0]}")
    dim = real.shape[1]
    # No cross-rank sync: the caller passes every rank's features already gathered.
    fid = FrechetInceptionDistance(feature=_Identity(dim), sync_on_compute=False)
    fid.update(real, real=True)
    fid.update(fake, real=False)
    out: dict[str, float | None] = {"fid": float(fid.compute())}
    size = min(int(kid_subset_size), real.shape[0], fake.shape[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "KID keeps all features in memory": we pass features
        kid = KernelInceptionDistance(feature=_Identity(dim), subsets=kid_subsets, subset_size=size,
                                      sync_on_compute=False)
    kid.update(real, real=True)
    kid.update(fake, real=False)
    with torch.random.fork_rng(devices=[]):  # KID samples subsets with the global RNG
        torch.manual_seed(seed)
        mean, std = kid.compute()
    out["kid_mean"], out["kid_std"] = float(mean), float(std)
    return out


def recall_at_k(similarity: Tensor, positives: Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Fraction of queries (rows) whose ``k`` most similar candidates include a positive.

    Args:
        similarity: (Q, C) query × candidate scores.
        positives: (Q, C) bool, True where the candidate is a right answer (several may be:
            e.g. images whose captions are the same string).
        ks: the cut-offs.

    Ties are broken by candidate index (``torch.topk`` on CPU is stable for equal values in
    practice; pass distinct scores where exactness matters).
    """
    if similarity.shape != positives.shape:
        raise ValueError(f"similarity {tuple(similarity.shape)} and positives {tuple(positives.shape)} differ")
    if not bool(positives.any(dim=1).all()):
        raise ValueError("recall_at_k: every query needs at least one positive candidate")
    out = {}
    for k in ks:
        k_eff = min(int(k), similarity.shape[1])
        top = similarity.topk(k_eff, dim=1).indices  # (Q, k)
        hit = torch.gather(positives, 1, top).any(dim=1)
        out[int(k)] = float(hit.double().mean())
    return out


def usage_from_counts(counts: Tensor) -> dict[str, float]:
    """``usage`` (fraction of codes chosen at least once), ``perplexity`` (exp of the entropy
    of the code histogram; :func:`~lgvq_plugins.evaluation.codebook.codebook_stats`) and
    ``codes_used`` of a (K,) count vector."""
    stats = codebook_stats(counts.double())
    return {"usage": float(stats.usage), "perplexity": float(stats.perplexity),
            "codes_used": int((counts > 0).sum())}


def similarity_mse_sums(words: Tensor, codes: Tensor, real: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Sum of squared errors between word–word and code–code cosine similarities, and the
    number of pairs, over pairs (l, m), l ≠ m, of real words of the same caption.

    Args:
        words: (B, L, Dt) word features t.
        codes: (B, L, Dt) the (projected) codes aligned to each word.
        real: (B, L) bool, the words that count.

    Returns:
        ``(sum, pairs)`` as float64 0-d tensors; ``sum / pairs`` is the MSE (L_ras, "real_words").
    """
    t = F.normalize(words.double(), dim=-1, eps=eps)
    c = F.normalize(codes.double(), dim=-1, eps=eps)
    err = (c @ c.transpose(1, 2) - t @ t.transpose(1, 2)).square()
    length = real.shape[1]
    pairs = real[:, :, None] & real[:, None, :] & ~torch.eye(length, dtype=torch.bool, device=real.device)
    return torch.where(pairs, err, torch.zeros_like(err)).sum(), pairs.sum().double()


__all__ = ["fid_kid_from_features", "recall_at_k", "similarity_mse_sums", "usage_from_counts"]
