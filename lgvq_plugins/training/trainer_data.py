"""The trainer's data side: micro-batches of map-style data (resumable sampler, equal epochs
on every rank) or of a stream (``IterableDataset``), and where in the data a run stands."""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, DistributedSampler

from lgvq_plugins.data.sampler import ResumableSampler
from lgvq_plugins.training.batch_checks import collate_samples
from lgvq_plugins.training.stream import TrainStream


class TrainerData:
    """Mixed into :class:`~lgvq_plugins.training.trainer.Trainer`; uses its data, batch size,
    accumulation, seed, rank and the position ``epoch`` / ``batch_in_epoch``."""

    def _train_loader(self, epoch: int, start_batch: int) -> DataLoader:
        if hasattr(self.train_data, "set_epoch"):
            self.train_data.set_epoch(epoch)
        sampler = ResumableSampler(self.train_data, shuffle=True, seed=self.seed, drop_last=True)
        sampler.set_epoch(epoch, start=start_batch * self.batch_size)
        # A private generator per (seed, epoch, rank): the loader never draws from the global
        # RNG, and worker seeds do not depend on whether the run was restarted.
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch * 7919 + self.rank)
        return DataLoader(self.train_data, batch_size=self.batch_size, sampler=sampler, drop_last=True,
                          num_workers=self.num_workers, generator=generator, collate_fn=collate_samples,
                          pin_memory=self.device.type == "cuda")

    def _micro_batches_per_epoch(self) -> int:
        per_rank = len(DistributedSampler(self.train_data, num_replicas=self.world_size, rank=self.rank,
                                          shuffle=False, drop_last=True))
        usable = (per_rank // self.batch_size) // self.grad_accum_steps * self.grad_accum_steps
        if usable == 0:
            raise ValueError(
                f"the training set ({len(self.train_data)} samples) is too small for Trainer.batch_size="
                f"{self.batch_size} × grad_accum_steps={self.grad_accum_steps} × {self.world_size} rank(s); "
                "lower the batch size or use more data")
        return usable

    def _indexed_micro_batches(self) -> Iterator[list[Any]]:
        """Map-style data: ``grad_accum_steps`` micro-batches per update, epoch after epoch.
        The position counts a group as consumed when it is handed out (the checkpoint after
        its update then records it)."""
        per_epoch = self._micro_batches_per_epoch()
        while True:
            if self.batch_in_epoch >= per_epoch:
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            loader = iter(self._train_loader(self.epoch, self.batch_in_epoch))
            while self.batch_in_epoch < per_epoch:
                micro = [next(loader) for _ in range(self.grad_accum_steps)]
                self.batch_in_epoch += self.grad_accum_steps
                yield micro

    def _streamed_micro_batches(self, stream: TrainStream) -> Iterator[list[Any]]:
        """An IterableDataset: micro-batches from this rank's endless stream."""
        try:
            while True:
                micro = stream.micro_batches(self.grad_accum_steps)
                self.epoch, self.batch_in_epoch = stream.epoch, stream.batches
                yield micro
        finally:
            stream.close()
