"""A data order that survives a restart."""

from __future__ import annotations

from typing import Iterator

from torch.utils.data import Dataset, DistributedSampler, Sampler

from lgvq_plugins.training import distributed as D


class ResumableSampler(Sampler[int]):
    """A :class:`DistributedSampler` (shuffled by ``seed + epoch``) that can start part-way
    through an epoch, so a resumed run sees exactly the samples the interrupted one had not."""

    def __init__(self, dataset: Dataset, *, shuffle: bool, seed: int, drop_last: bool):
        self.inner = DistributedSampler(dataset, num_replicas=D.world_size(), rank=D.rank(),
                                        shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.inner.set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[int]:
        indices = list(self.inner)
        return iter(indices[self.start:])

    def __len__(self) -> int:
        return max(len(self.inner) - self.start, 0)
