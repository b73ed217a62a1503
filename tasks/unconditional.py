"""``unconditional``: a GPT prior over the frozen tokenizer's codes, sampled freely; FID.

Also home of :class:`GenerativeTask`, the protocol shared by the generation tasks
(``unconditional``, ``completion``, ``text_to_image``):

1. codes of a *training* split of the evaluated data set (same settings, ``train_images``
   samples) are extracted once by the frozen tokenizer and cached
   (:func:`~lgvq_plugins.second_stage.code_cache.cached_codes`);
2. a :class:`~lgvq_plugins.second_stage.gpt.CodeGPT` (gin: ``CodeGPT.*``) is trained on them
   (gin: ``second_stage_training.*``), checkpointed under
   ``<out_dir>/gpt/<codes hash>/`` and resumed from there when the task runs again;
3. for each of the first ``max_images`` evaluated samples one image is generated (under the
   task's conditioning) and decoded; FID compares the generated images with the real ones
   in a registered extractor's feature space (``shapes_probe`` on ``shapes``, else
   ``inception``); ``nll`` is the prior's held-out cross-entropy on the evaluated
   images' own codes (nats per code; lower = codes easier to model).

Under torchrun every rank trains the same prior (same seed, same data, no collectives) and
generates for its own shard; features are gathered in sample order.
"""

from __future__ import annotations

import inspect
import math
import warnings
from pathlib import Path
from typing import Any

import torch
from lgvq_plugins.tasks.features import create_fid_extractor, looks_like_shapes
from torch import Tensor, nn
from torch.utils.data import Dataset

from lgvq_plugins.evaluation.scores import fid_kid_from_features
from lgvq_plugins.evaluation.task import TaskResult, gather_rows, model_device, shard
from lgvq_plugins.second_stage.code_cache import cached_codes, codes_path
from lgvq_plugins.second_stage.gpt import CodeGPT
from lgvq_plugins.second_stage.train import TrainSettings, train_code_gpt
from lgvq_plugins.training import distributed as D


def train_split_of(data: Dataset, split: str, num_samples: int | None) -> Dataset:
    """The ``split`` of ``data``'s data set with ``data``'s settings and ``num_samples``
    samples (the constructor's arguments read back from same-named attributes)."""
    if getattr(data, "split", None) == split:
        raise ValueError(f"the second stage would train on the evaluated split {split!r}; set "
                         "`<task>.train_split` to another split")
    cls = type(data)
    params = inspect.signature(cls).parameters
    if "split" not in params:
        raise ValueError(f"cannot build the {split!r} split of {cls.__name__} to train the second stage: its "
                         "constructor takes no `split`")
    kwargs = {n: getattr(data, n) for n in params if n not in ("split", "num_samples") and hasattr(data, n)}
    if "num_samples" in params:
        kwargs["num_samples"] = num_samples
    return cls(split=split, **kwargs)


class GenerativeTask:
    """Shared protocol of the generation tasks (see the module docstring).

    Args:
        max_images: evaluated samples (one generated image each).
        batch_size: images per generation / encoding batch.
        train_split, train_images: the split (and how many of its samples) the prior learns.
        fid_extractor: registered ``metric`` (``"auto"``: ``shapes_probe`` on ``shapes``,
            else ``inception``; None: no FID).
        fid_extractor_config: settings for the extractor's factory.
        temperature, top_k, top_p: sampling (top_k=1: greedy, deterministic).
        seed: seed of the prior's initialisation, batch order and sampling.
        cache_dir: code cache folder (default ``$LGVQ_CACHE_DIR`` or ``~/.cache/lgvq_plugins``).
        grid_images: generated images written to ``samples.png``.
    """

    needs = "tokenizer"
    #: what conditions the prior ("none", "text", "top_half")
    conditioning = "none"
    #: per-batch sums :meth:`extra_metrics` adds to (every rank starts them at 0, so the
    #: all-reduce sees the same keys even on a rank with an empty shard)
    extra_sums: tuple[str, ...] = ()

    def __init__(self, max_images: int | None = 256, batch_size: int = 32, train_split: str = "train",
                 train_images: int | None = 2000, fid_extractor: str | None = "auto",
                 fid_extractor_config: dict[str, Any] | None = None, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                 cache_dir: str | None = None, grid_images: int = 16):
        self.max_images, self.batch_size = max_images, int(batch_size)
        self.train_split, self.train_images = train_split, train_images
        self.fid_extractor, self.fid_extractor_config = fid_extractor, dict(fid_extractor_config or {})
        self.temperature, self.top_k, self.top_p = float(temperature), top_k, top_p
        self.seed, self.cache_dir, self.grid_images = int(seed), cache_dir, int(grid_images)
        self.grid: tuple[int, int] | None = None  # the code grid, known once codes are extracted

    # -- hooks for the conditioned tasks ----------------------------------------------------
    def cond_dim(self) -> int | None:
        return None

    def prefix(self, data: Dataset, indices: list[int], codes: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """Conditioning prefix (B, P, C) and mask (B, P) of samples ``indices`` of ``data``
        whose codes are ``codes`` (B, N)."""
        return None, None

    def given(self, codes: Tensor, grid: tuple[int, int]) -> Tensor | None:
        """Codes copied rather than sampled (completion: the top half); ``codes`` (B, h·w)
        in raster order on a ``grid`` (h, w)."""
        return None

    def extra_metrics(self, data: Dataset, indices: list[int], images: Tensor, extractor: nn.Module | None,
                      sums: dict[str, float]) -> None:
        """Add per-batch sums of task-specific metrics (text_to_image: caption match)."""

    def finish_metrics(self, data: Dataset, sums: dict[str, float], n: int, metrics: dict[str, float | None],
                       unavailable: dict[str, str], extractor: nn.Module | None) -> None:
        """Turn the sums of :meth:`extra_metrics` into metrics."""

    def prepare(self, data: Dataset) -> None:
        """Build what the task-specific metrics need, on every rank before any batch (a
        network trained on first use waits at a barrier: every rank must reach it together)."""

    def extra_protocol(self) -> dict[str, Any]:
        """Task-specific entries of the result's protocol (semantic synthesis: its segmenter)."""
        return {}

    # -- the protocol -----------------------------------------------------------------------
    def _extractor(self, data: Dataset, unavailable: dict[str, str]) -> nn.Module | None:
        extractor, why = create_fid_extractor(self.fid_extractor, self.fid_extractor_config, data)
        if extractor is None:
            unavailable["fid"] = why
            if self.fid_extractor is not None:
                warnings.warn(f"{type(self).__name__}: FID not computed: {why}", stacklevel=3)
        return extractor

    def prior(self, tokenizer: nn.Module, data: Dataset, out_dir: Path) -> tuple[CodeGPT, dict[str, Any]]:
        """The trained prior (trained here, or resumed/loaded from ``out_dir/gpt/<hash>``)."""
        train = train_split_of(data, self.train_split, self.train_images)
        codes = cached_codes(tokenizer, train, batch_size=self.batch_size, cache_dir=self.cache_dir)
        flat = codes.reshape(codes.shape[0], -1)
        self.grid = (int(codes.shape[1]), int(codes.shape[2]))  # (h, w), for the prefix hooks
        prefix, mask = self.prefix(train, list(range(len(train))), flat)
        settings = TrainSettings()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            gpt = CodeGPT(num_codes=int(tokenizer.quantizer.num_codes), seq_len=flat.shape[1],
                          cond_dim=self.cond_dim(), max_prefix=prefix.shape[1] if prefix is not None else 64)
        gpt = gpt.to(model_device(tokenizer))
        ckpt_dir = out_dir / "gpt" / codes_path(tokenizer, train, self.cache_dir).stem
        stats = train_code_gpt(gpt, flat, settings, prefix=prefix, prefix_mask=mask,
                               checkpoint_dir=ckpt_dir if D.is_main_process() else None)
        return gpt, {"train": {"split": self.train_split, "images": len(train), "grid": list(codes.shape[1:]),
                               **settings.protocol(), "final_loss": stats["loss"]},
                     "model": {"width": gpt.head.in_features, "depth": len(gpt.blocks),
                               "parameters": sum(p.numel() for p in gpt.parameters())}}

    def run(self, tokenizer: nn.Module, data: Dataset, out_dir: Path) -> TaskResult:
        device = model_device(tokenizer)
        unavailable: dict[str, str] = {}
        gpt, prior_protocol = self.prior(tokenizer, data, out_dir)
        subset, total = shard(data, self.max_images)
        eval_grid = cached_codes(tokenizer, data, batch_size=self.batch_size, cache_dir=self.cache_dir)
        h, w = eval_grid.shape[1:]
        eval_codes = eval_grid.reshape(eval_grid.shape[0], -1)
        extractor = self._extractor(data, unavailable)
        if extractor is not None:
            extractor = extractor.to(device)
        self.prepare(data)
        real_feats: list[Tensor] = []
        fake_feats: list[Tensor] = []
        grid: list[Tensor] = []
        sums: dict[str, float] = {"nll": 0.0, "codes": 0.0, **dict.fromkeys(self.extra_sums, 0.0)}
        gen = torch.Generator(device=device).manual_seed(self.seed * 1000 + D.rank())
        indices = list(subset.indices)
        for start in range(0, len(indices), self.batch_size):
            idx = indices[start: start + self.batch_size]
            codes = eval_codes[idx].to(device)
            prefix, mask = self.prefix(data, idx, codes.cpu())
            prefix = prefix.to(device) if prefix is not None else None
            mask = mask.to(device) if mask is not None else None
            logits = gpt(codes, prefix, mask)
            sums["nll"] += float(torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(), codes.reshape(-1), reduction="sum"))
            sums["codes"] += codes.numel()
            sampled = gpt.sample(len(idx), prefix=prefix, prefix_mask=mask, given=self.given(codes, (h, w)),
                                 temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, generator=gen)
            fake = tokenizer.decode_indices(sampled.reshape(len(idx), h, w)).float().clamp(-1, 1)
            real = torch.stack([data[i]["image"] for i in idx]).to(device).float()
            if extractor is not None:
                real_feats.append(extractor(real).double())
                fake_feats.append(extractor(fake).double())
            self.extra_metrics(data, idx, fake, extractor, sums)
            if len(grid) < self.grid_images:
                grid.extend(torch.stack([real, fake], 1)[: self.grid_images - len(grid)].cpu())
        reduced = torch.tensor(list(sums.values()), dtype=torch.float64, device=device)
        D.all_reduce_sum(reduced)
        sums = dict(zip(sums, reduced.tolist()))
        n_all = total
        metrics: dict[str, float | None] = {"fid": None, "nll": sums["nll"] / max(sums["codes"], 1.0)}
        metrics["bits_per_code"] = metrics["nll"] / math.log(2)
        if extractor is not None:
            dim = extractor.num_features
            empty = torch.zeros(0, dim, dtype=torch.float64, device=device)
            real = gather_rows(torch.cat(real_feats) if real_feats else empty)
            fake = gather_rows(torch.cat(fake_feats) if fake_feats else empty)
            if real.shape[0] >= 2:
                metrics["fid"] = fid_kid_from_features(real, fake, kid_subsets=10, kid_subset_size=real.shape[0],
                                                       seed=self.seed)["fid"]
            else:
                unavailable["fid"] = f"FID needs at least 2 images, got {real.shape[0]}"
        self.finish_metrics(data, sums, n_all, metrics, unavailable, extractor)
        protocol: dict[str, Any] = {
            "split": getattr(data, "split", None), "images": n_all, "conditioning": self.conditioning,
            "sampling": {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p,
                         "seed": self.seed},
            "prior": prior_protocol, "nll": "cross-entropy of the prior on the evaluated images' codes, nats/code",
            "processes": D.world_size(),
        }
        if extractor is not None:
            protocol["fid"] = {**getattr(extractor, "protocol", {"extractor": type(extractor).__name__}),
                               "reference": "real images of the evaluated samples"}
        protocol.update(self.extra_protocol())
        artefacts: dict[str, str] = {}
        if grid and D.is_main_process():
            from torchvision.utils import save_image

            save_image((torch.stack(grid).flatten(0, 1) + 1) / 2, out_dir / "samples.png", nrow=2, padding=1)
            artefacts["samples"] = "samples.png"
        return TaskResult(metrics=metrics, protocol=protocol, unavailable=unavailable, artefacts=artefacts)


class Unconditional(GenerativeTask):
    """Unconditional generation: FID of freely sampled images (gin: ``unconditional.*``)."""

    conditioning = "none"


__all__ = ["GenerativeTask", "Unconditional", "looks_like_shapes", "train_split_of"]
