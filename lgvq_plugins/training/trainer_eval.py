"""The trainer's evaluation side: validation metrics, sample grids and the codebook report."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from lgvq_plugins.evaluation.metrics import PSNR, CodebookUsage
from lgvq_plugins.training import distributed as D
from lgvq_plugins.training.stream import eval_loader, first_samples
from lgvq_plugins.training.logs import to_float


def codebook_fingerprint(codebook: Tensor) -> str:
    """SHA-256 of a codebook's float32 bytes (equal fingerprints ⇔ bit-identical codebooks)."""
    data = codebook.detach().float().cpu().contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()


class TrainerEvaluation:
    """Mixed into :class:`~lgvq_plugins.training.trainer.Trainer`; uses its model, data,
    device and logger."""

    # ------------------------------------------------------------------------------------
    # Evaluation
    # ------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, data: Dataset | None = None, max_batches: int | None = None) -> dict[str, float]:
        """Reconstruction metrics of the tokenizer on ``data`` (default: the validation set):
        ``psnr``, ``rec_loss`` (mean L1), ``mse``, ``codebook_usage``, ``perplexity``.

        Every rank evaluates its shard; the numbers are reduced over ranks.
        """
        data = data if data is not None else self.val_data
        if data is None:
            return {}
        was_training = self.model.training
        self.model.eval()
        psnr = PSNR().to(self.device)
        usage = CodebookUsage(self.tokenizer.quantizer.num_codes).to(self.device)
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # L1 sum, SE sum, pixels
        loader = eval_loader(data, batch_size=self.batch_size, num_workers=self.num_workers, rank=self.rank,
                             world_size=self.world_size)  # map-style or a stream (IterableDataset)
        try:
            for i, raw in enumerate(loader):
                if max_batches is not None and i >= max_batches:
                    break
                x = raw["image"].to(self.device)
                with self.autocast():
                    rec, quantized = self.tokenizer(x)
                rec = rec.float()
                psnr.update(rec, x)
                usage.update(quantized.indices)
                diff = (rec - x).double()
                sums += torch.stack([diff.abs().sum(), diff.pow(2).sum(),
                                     torch.tensor(float(diff.numel()), dtype=torch.float64, device=self.device)])
        finally:
            self.model.train(was_training)
        D.all_reduce_sum(sums)
        codes = usage.compute()
        return {"psnr": to_float(psnr.compute()), "rec_loss": to_float(sums[0] / sums[2].clamp_min(1)),
                "mse": to_float(sums[1] / sums[2].clamp_min(1)),
                "codebook_usage": to_float(codes["usage"]), "perplexity": to_float(codes["perplexity"])}

    def validate(self) -> dict[str, float]:
        """Periodic validation: metrics on ``val_batches`` batches, logged, plus a sample grid."""
        if self.val_data is None:
            return {}
        metrics = self.evaluate(max_batches=self.val_batches)
        self.logger.log(self.step, metrics, split="val")
        if self.is_main_process:
            self.save_samples()
        return metrics

    @torch.no_grad()
    def save_samples(self, path: str | os.PathLike[str] | None = None) -> Path:
        """Originals (top row) above their reconstructions (bottom row) as one PNG."""
        from torchvision.utils import save_image

        path = Path(path) if path is not None else self.samples_dir / f"step_{self.step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        samples = first_samples(self.val_data, self.num_samples)
        n = len(samples)
        x = torch.stack([s["image"] for s in samples]).to(self.device)
        was_training = self.model.training
        self.model.eval()
        try:
            with self.autocast():
                rec, _ = self.tokenizer(x)
        finally:
            self.model.train(was_training)
        grid = torch.cat([x, rec.float().clamp(-1, 1)]).cpu()
        save_image(grid, str(path), nrow=n, normalize=True, value_range=(-1, 1))
        return path

    # ------------------------------------------------------------------------------------
    # End of run
    # ------------------------------------------------------------------------------------
    def codebook_report(self) -> dict[str, Any]:
        """Fingerprint of the codebook on every rank: ``codebooks_identical`` is True when all
        ranks hold bit-identical codebooks; ``codebook_max_abs_diff`` the largest difference."""
        codebook = self.tokenizer.quantizer.codebook.detach().float().contiguous()
        if self.dump_codebooks:
            from safetensors.torch import save_file

            self.out_dir.mkdir(parents=True, exist_ok=True)
            save_file({"codebook": codebook.cpu().clone()}, str(self.out_dir / f"codebook_rank{self.rank}.safetensors"))
        gathered = D.all_gather_cat(codebook[None])  # (world, K, D)
        diff = (gathered - gathered[:1]).abs().max() if gathered.numel() else torch.zeros(())
        fingerprints = [codebook_fingerprint(c) for c in gathered]
        return {"codebook_sha256": fingerprints, "codebooks_identical": len(set(fingerprints)) == 1,
                "codebook_max_abs_diff": to_float(diff)}
