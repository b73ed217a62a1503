"""``reconstruction``: how well the tokenizer reproduces images, and how much codebook it uses.

Metrics (images in [-1, 1], mapped to [0, 1] for PSNR/SSIM):

* ``psnr`` — mean per-image PSNR (dB, peak 1); ``ssim`` — torchmetrics SSIM (Gaussian
  11×11, σ 1.5), mean over images;
* ``lpips`` — mean LPIPS (VGG) when its backbone weights are on the machine, else
  ``None`` with the reason (never 0);
* ``fid``, ``kid_mean``, ``kid_std`` — originals vs reconstructions, through torchmetrics,
  in the feature space of a registered extractor (``inception`` or ``shapes_probe``);
* ``usage`` (fraction of the K codes used over the *whole* evaluated set), ``perplexity``
  and ``codes_used``; ``tables["usage_histogram"]`` holds the K counts.

Under torchrun each rank takes samples ``rank::world``; sums and histograms are all-reduced
and FID/KID features gathered in sample order, so every image counts exactly once.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from lgvq_plugins.tasks.features import create_fid_extractor
from torch import Tensor, nn
from torch.utils.data import Dataset

from lgvq_plugins import api
from lgvq_plugins.evaluation.codebook import code_histogram
from lgvq_plugins.evaluation.scores import fid_kid_from_features, usage_from_counts
from lgvq_plugins.evaluation.task import (
    TaskResult,
    batches,
    gather_rows,
    model_device,
    shard,
)
from lgvq_plugins.training import distributed as D


def _lpips_weights_present(net: str) -> bool:
    """Whether torchvision's hub cache holds the LPIPS backbone (checked without trying a
    download, which fails slowly offline)."""
    import os

    import torchvision

    enum = {"vgg": "VGG16_Weights", "alex": "AlexNet_Weights", "squeeze": "SqueezeNet1_1_Weights"}[net]
    url = getattr(torchvision.models, enum).IMAGENET1K_V1.url
    return (Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)).is_file()


class Reconstruction:
    """Reconstruction quality and codebook usage of a tokenizer (gin: ``reconstruction.*``).

    Args:
        batch_size: images per forward pass.
        max_images: evaluate the first ``max_images`` samples (None: all).
        fid_extractor: registered ``metric`` giving FID features: ``"inception"``,
            ``"shapes_probe"``, ``"auto"`` (``shapes_probe`` on ``shapes`` data, else
            ``inception``) or ``None`` (no FID/KID).
        fid_extractor_config: settings passed to the extractor's factory (e.g.
            ``{"weights_path": ...}`` or a smaller probe), on top of its gin bindings.
        kid_subsets, kid_subset_size: KID's subset sampling (subset size capped at the image count).
        lpips: compute LPIPS when its weights are present.
        lpips_net: LPIPS backbone (``vgg`` as LG-VQ/taming).
        lpips_weights: local torchvision weights of the backbone (else torch's hub cache).
        grid_images: originals/reconstructions written to ``reconstructions.png``.
        seed: KID subset seed.
    """

    needs = "tokenizer"

    def __init__(self, batch_size: int = 32, max_images: int | None = None, fid_extractor: str | None = "auto",
                 fid_extractor_config: dict[str, Any] | None = None, kid_subsets: int = 100, kid_subset_size: int = 1000, lpips: bool = True, lpips_net: str = "vgg",
                 lpips_weights: str | None = None, grid_images: int = 8, seed: int = 0):
        self.batch_size, self.max_images = int(batch_size), max_images
        self.fid_extractor, self.fid_extractor_config = fid_extractor, dict(fid_extractor_config or {})
        self.kid_subsets, self.kid_subset_size = int(kid_subsets), int(kid_subset_size)
        self.lpips, self.lpips_net, self.lpips_weights = bool(lpips), lpips_net, lpips_weights
        self.grid_images, self.seed = int(grid_images), int(seed)

    # -- optional parts --------------------------------------------------------------------
    def _extractor(self, data: Dataset, unavailable: dict[str, str]) -> nn.Module | None:
        extractor, why = create_fid_extractor(self.fid_extractor, self.fid_extractor_config, data)
        if self.fid_extractor is None:
            unavailable["fid"] = unavailable["kid_mean"] = "reconstruction.fid_extractor = None"
        elif extractor is None:
            unavailable["fid"] = unavailable["kid_mean"] = unavailable["kid_std"] = why
            warnings.warn(f"reconstruction: FID/KID not computed: {why}", stacklevel=3)
        return extractor

    def _lpips(self, unavailable: dict[str, str]) -> nn.Module | None:
        if not self.lpips:
            unavailable["lpips"] = "reconstruction.lpips = False"
            return None
        if self.lpips_weights is None and not _lpips_weights_present(self.lpips_net):
            unavailable["lpips"] = (f"LPIPS ({self.lpips_net}) backbone weights are not on this machine (torch hub "
                                    "cache empty; nothing is downloaded); bind reconstruction.lpips_weights "
                                    "to a local torchvision file")
            return None
        try:
            return api.create("perceptual_loss", "lpips", net=self.lpips_net, backbone_weights=self.lpips_weights)
        except Exception as exc:  # noqa: BLE001
            unavailable["lpips"] = f"LPIPS unavailable: {exc}"
            return None

    # -- the task --------------------------------------------------------------------------
    def run(self, tokenizer: nn.Module, data: Dataset, out_dir: Path) -> TaskResult:
        from torchmetrics.image import StructuralSimilarityIndexMeasure

        device = model_device(tokenizer)
        _, total = shard(data, self.max_images)
        unavailable: dict[str, str] = {}
        extractor = self._extractor(data, unavailable)
        lpips = self._lpips(unavailable)
        if extractor is not None:
            extractor = extractor.to(device)
        if lpips is not None:
            lpips = lpips.to(device)
        num_codes = int(tokenizer.quantizer.num_codes)
        # float64 sums: psnr, ssim, lpips, L1, squared error, pixels, images
        sums = torch.zeros(7, dtype=torch.float64, device=device)
        counts = torch.zeros(num_codes, dtype=torch.int64, device=device)
        ssim = StructuralSimilarityIndexMeasure(data_range=1.0, reduction="none").to(device)
        real_feats: list[Tensor] = []
        fake_feats: list[Tensor] = []
        grid: list[Tensor] = []
        image_shape: tuple[int, ...] | None = None
        for batch in batches(data, self.batch_size, self.max_images):
            x = batch["image"].to(device).float()
            image_shape = tuple(x.shape[1:])
            rec, quantized = tokenizer(x)
            rec = rec.float().clamp(-1, 1)
            p, t = (rec.double() + 1) / 2, (x.double() + 1) / 2
            mse = (p - t).square().flatten(1).mean(1)
            sums[0] += (-10 * torch.log10(mse.clamp_min(1e-10))).sum()
            sums[1] += ssim(p.float(), t.float()).double().sum()
            if lpips is not None:
                sums[2] += lpips(rec, x).double().sum()
            sums[3] += (p - t).abs().sum()
            sums[4] += (p - t).square().sum()
            sums[5] += p[0].numel() * p.shape[0]
            sums[6] += x.shape[0]
            counts += code_histogram(quantized.indices, num_codes)
            if extractor is not None:
                real_feats.append(extractor(x).double())
                fake_feats.append(extractor(rec).double())
            if len(grid) < self.grid_images:
                grid.extend(torch.stack([x, rec], 1)[: self.grid_images - len(grid)].cpu())
        D.all_reduce_sum(sums)
        D.all_reduce_sum(counts)
        n = max(float(sums[6]), 1.0)
        metrics: dict[str, float | None] = {
            "psnr": float(sums[0]) / n, "ssim": float(sums[1]) / n,
            "lpips": float(sums[2]) / n if lpips is not None else None,
            "l1": float(sums[3]) / max(float(sums[5]), 1.0), "mse": float(sums[4]) / max(float(sums[5]), 1.0),
        }
        metrics.update(usage_from_counts(counts.cpu()))
        metrics.update({"fid": None, "kid_mean": None, "kid_std": None})
        if extractor is not None:
            dim = extractor.num_features
            real = gather_rows(torch.cat(real_feats) if real_feats else torch.zeros(0, dim, device=device,
                                                                                     dtype=torch.float64))
            fake = gather_rows(torch.cat(fake_feats) if fake_feats else torch.zeros(0, dim, device=device,
                                                                                     dtype=torch.float64))
            if real.shape[0] >= 2:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # KID's "features kept in memory" notice
                    metrics.update(fid_kid_from_features(real, fake, kid_subsets=self.kid_subsets,
                                                         kid_subset_size=self.kid_subset_size, seed=self.seed))
            else:
                unavailable["fid"] = unavailable["kid_mean"] = unavailable["kid_std"] = \
                    f"FID/KID need at least 2 images, got {real.shape[0]}"
        protocol: dict[str, Any] = {
            "split": getattr(data, "split", None), "images": int(sums[6]), "images_requested": total,
            "image_shape": list(image_shape) if image_shape else None, "resize": "none (native resolution)",
            "psnr": "mean per-image PSNR, [0,1] range, peak 1", "ssim": "torchmetrics SSIM, gaussian 11, sigma 1.5",
            "usage": f"over all {int(sums[6])} images (not per batch), K={num_codes}",
            "processes": D.world_size(),
        }
        if extractor is not None:
            protocol["fid"] = {**getattr(extractor, "protocol", {"extractor": type(extractor).__name__}),
                               "reference": "originals of the same images", "kid_subsets": self.kid_subsets,
                               "kid_subset_size": min(self.kid_subset_size, int(sums[6]))}
        if lpips is not None:
            protocol["lpips"] = {"net": self.lpips_net}
        artefacts: dict[str, str] = {}
        if grid and D.is_main_process():
            from torchvision.utils import save_image

            pairs = torch.stack(grid)  # (n, 2, 3, H, W): original, reconstruction
            save_image((pairs.flatten(0, 1) + 1) / 2, out_dir / "reconstructions.png", nrow=2, padding=1)
            artefacts["reconstructions"] = "reconstructions.png"
        return TaskResult(metrics=metrics, protocol=protocol, unavailable=unavailable, artefacts=artefacts,
                          tables={"usage_histogram": counts.cpu().tolist()})


__all__ = ["Reconstruction"]
