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

import torch
from torch import Tensor
from torchmetrics import Metric

from lgvq_plugins.hookspecs import hookimpl


class PSNR(Metric):
    """Peak signal-to-noise ratio of images in [-1, 1], mapped to [0, 1] (peak 1).

    Args:
        reduction: ``"per_image"`` (default) averages each image's PSNR — the usual figure in
            tokenizer papers; ``"global"`` computes one PSNR from the MSE over all pixels.
        eps: floor on the MSE, so identical images give a large finite value, not ``inf``.
    """

    higher_is_better = True
    full_state_update = False

    def __init__(self, reduction: str = "per_image", eps: float = 1e-10, **kwargs):
        super().__init__(**kwargs)
        if reduction not in {"per_image", "global"}:
            raise ValueError(f"psnr reduction must be 'per_image' or 'global', got {reduction!r}")
        self.reduction = reduction
        self.eps = eps
        self.add_state("psnr_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sq_err_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("num_pixels", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("num_images", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:  # (B, C, H, W) in [-1, 1]
        if preds.shape != target.shape:
            raise ValueError(f"psnr: preds {tuple(preds.shape)} and target {tuple(target.shape)} differ")
        p = (preds.detach().double().clamp(-1, 1) + 1) / 2
        t = (target.detach().double().clamp(-1, 1) + 1) / 2
        sq = (p - t).pow(2).flatten(1)  # (B, C·H·W)
        mse = sq.mean(dim=1)
        self.psnr_sum += (-10.0 * torch.log10(mse.clamp_min(self.eps))).sum()
        self.sq_err_sum += sq.sum()
        self.num_pixels += sq.numel()
        self.num_images += sq.shape[0]

    def compute(self) -> Tensor:
        if self.reduction == "global":
            mse = self.sq_err_sum / self.num_pixels.clamp_min(1)
            return (-10.0 * torch.log10(mse.clamp_min(self.eps))).float()
        return (self.psnr_sum / self.num_images.clamp_min(1)).float()


class CodebookUsage(Metric):
    """How much of the codebook the evaluated set uses.

    ``compute()`` returns ``usage`` (fraction of the ``num_codes`` codes chosen at least
    once) and ``perplexity`` (``exp`` of the entropy of the code histogram: K when all codes
    are equally used, 1 when one code takes everything).
    """

    full_state_update = False

    def __init__(self, num_codes: int, **kwargs):
        super().__init__(**kwargs)
        if num_codes < 1:
            raise ValueError(f"codebook_usage needs num_codes >= 1, got {num_codes}")
        self.num_codes = int(num_codes)
        self.add_state("counts", default=torch.zeros(self.num_codes, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, indices: Tensor) -> None:  # any shape of int code indices
        flat = indices.detach().reshape(-1).long()
        if flat.numel() and (flat.min() < 0 or flat.max() >= self.num_codes):
            raise ValueError(f"codebook_usage: indices outside [0, {self.num_codes}) "
                             f"(min {int(flat.min())}, max {int(flat.max())}); is num_codes right?")
        self.counts += torch.bincount(flat, minlength=self.num_codes).to(self.counts)

    def compute(self) -> dict[str, Tensor]:
        total = self.counts.sum()
        probs = self.counts / total.clamp_min(1)
        entropy = -(probs * torch.log(probs.clamp_min(1e-30))).sum()
        return {"usage": (self.counts > 0).double().mean().float(),
                "perplexity": torch.exp(entropy).float()}


@hookimpl
def register_metrics(register):
    register("psnr", PSNR)
    register("codebook_usage", CodebookUsage)
