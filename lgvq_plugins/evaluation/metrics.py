"""Reconstruction and codebook metrics (built-in plugin module).

Both are ``torchmetrics.Metric`` classes, so their states are summed across ranks under
DDP by torchmetrics itself, and ``update`` / ``compute`` / ``reset`` work as usual::

    psnr = lgvq_plugins.create_metric("psnr")
    psnr.update(reconstruction, images)          # both in [-1, 1]
    psnr.compute()                               # mean per-image PSNR in dB

    usage = lgvq_plugins.create_metric("codebook_usage", num_codes=1024)
    usage.update(quantized.indices)
    usage.compute()                              # {"usage": ..., "perplexity": ...}
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.image import PeakSignalNoiseRatio

from lgvq_plugins.evaluation.codebook import code_histogram, codebook_stats
from lgvq_plugins.hookspecs import hookimpl


class PSNR(PeakSignalNoiseRatio):
    """Peak signal-to-noise ratio of images in [-1, 1] (clamped to it; peak-to-peak 2, which
    equals PSNR on [0, 1] images with peak 1): torchmetrics' ``PeakSignalNoiseRatio``.

    Args:
        reduction: ``"per_image"`` (default) averages each image's PSNR — the usual figure in
            tokenizer papers; ``"global"`` computes one PSNR from the MSE over all pixels.
        eps: floor on the MSE, so identical images give a large finite value
            (``-10·log10(eps)``, 100 dB by default), not ``inf``.
    """

    def __init__(self, reduction: str = "per_image", eps: float = 1e-10, **kwargs):
        if reduction not in {"per_image", "global"}:
            raise ValueError(f"psnr reduction must be 'per_image' or 'global', got {reduction!r}")
        per_image = reduction == "per_image"
        # per image: torchmetrics keeps one squared-error sum per image (dim=1 of the
        # flattened images) and returns every image's PSNR; we average after the eps floor.
        super().__init__(data_range=(-1.0, 1.0), reduction="none" if per_image else "elementwise_mean",
                         dim=1 if per_image else None, **kwargs)
        self.set_dtype(torch.float64)  # sums over many pixels stay exact enough
        self.psnr_reduction = reduction
        self.eps = eps
        self.max_db = -10.0 * math.log10(eps)

    def update(self, preds: Tensor, target: Tensor) -> None:  # (B, C, H, W) in [-1, 1]
        if preds.shape != target.shape:
            raise ValueError(f"psnr: preds {tuple(preds.shape)} and target {tuple(target.shape)} differ")
        super().update(preds.detach().double().flatten(1), target.detach().double().flatten(1))

    def compute(self) -> Tensor:
        # after a DDP sync the per-image states are one concatenated tensor, not a list
        seen = len(self.total) if isinstance(self.total, list) else int((self.total > 0).sum())
        if not seen:
            return torch.tensor(0.0)
        values = super().compute().clamp_max(self.max_db)  # (N,) per image, or one value
        return values.mean().float()


class CodebookUsage(Metric):
    """How much of the codebook the evaluated set uses.

    ``compute()`` returns ``usage`` (fraction of the ``num_codes`` codes chosen at least
    once) and ``perplexity`` (``exp`` of the entropy of the code histogram: K when all codes
    are equally used, 1 when one code takes everything), both from
    :func:`lgvq_plugins.evaluation.codebook.codebook_stats`.
    """

    full_state_update = False

    def __init__(self, num_codes: int, **kwargs):
        super().__init__(**kwargs)
        if num_codes < 1:
            raise ValueError(f"codebook_usage needs num_codes >= 1, got {num_codes}")
        self.num_codes = int(num_codes)
        self.add_state("counts", default=torch.zeros(self.num_codes, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, indices: Tensor) -> None:  # any shape of int code indices
        try:
            counts = code_histogram(indices, self.num_codes)
        except ValueError as exc:
            raise ValueError(f"codebook_usage: {exc}") from None
        self.counts += counts.to(self.counts)

    def compute(self) -> dict[str, Tensor]:
        stats = codebook_stats(self.counts)
        return {"usage": stats.usage.float(), "perplexity": stats.perplexity.float()}


@hookimpl
def register_metrics(register):
    register("psnr", PSNR)
    register("codebook_usage", CodebookUsage)
