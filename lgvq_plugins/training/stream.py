"""Training on an ``IterableDataset`` (``webdataset`` shards): steps, not epochs, and a
stream that continues where it stopped when a run is resumed.

A streamed data set has no length and no random access, so the trainer cannot sample it by
index. Instead each rank draws micro-batches from :class:`TrainStream`:

* **Steps, endless epochs.** Training length is ``Trainer.max_steps``. When this rank's
  stream ends (its shards are read), the next epoch starts at once: ``set_epoch(epoch + 1)``
  re-shuffles the shard order with a seed that depends on the epoch. Every rank does this
  on its own, so ranks whose shards hold fewer samples simply start their next epoch
  sooner: every rank takes exactly ``max_steps`` optimizer steps and DDP's all-reduce never
  waits for a rank that ran dry. (Under DDP the ranks' epochs are therefore not aligned.)
* **Resume.** The stream's state — epoch, micro-batches consumed in it, and for data sets
  that report where each sample comes from (``stream_pos`` = worker, shard slot, member;
  see :mod:`lgvq_plugins.data.webdataset`) the last position consumed per DataLoader
  worker — is saved in every checkpoint, one entry per rank. A resumed run reopens the same
  epoch and starts each worker right after its last consumed sample, skipping whole shards
  without opening them. A data set without positions is re-read from the epoch's start and
  the consumed batches are dropped (exact when its order is deterministic per epoch, but the
  skipped samples are read and decoded again).

What is exact and what is not is spelled out in docs/data.md ("Training on a stream").
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset

from lgvq_plugins.training.batch_checks import collate_samples

#: the sample field in which a data set reports where a sample comes from: (worker, slot, member)
POSITION_FIELD = "stream_pos"


def is_stream(data: Any) -> bool:
    """True for an ``IterableDataset`` (trained through :class:`TrainStream`)."""
    return isinstance(data, IterableDataset)


class StreamEpochError(ValueError):
    """An epoch of a rank's stream gave no full micro-batch."""


class TrainStream:
    """This rank's endless supply of micro-batches from an ``IterableDataset``.

    Args:
        data: the training data set. Optional methods it may have: ``set_epoch(epoch)``
            (re-shuffle per epoch), ``set_stream_start({worker: (slot, member)})`` (resume
            by position, with samples carrying ``stream_pos``), and
            ``check_stream_split(world_size, num_workers)`` (refuse a split that leaves a
            rank without data).
        batch_size / num_workers / pin_memory: passed to the ``DataLoader`` (no sampler;
            ``drop_last``: each worker drops its own last partial batch).
        seed / rank / world_size: the loader's private generator (worker seeds) depends on
            (seed, epoch, rank), never on the global RNG.
    """

    def __init__(self, data: IterableDataset, *, batch_size: int, num_workers: int = 0, seed: int = 0,
                 rank: int = 0, world_size: int = 1, pin_memory: bool = False):
        self.data, self.batch_size, self.num_workers = data, int(batch_size), int(num_workers)
        self.seed, self.rank, self.world_size, self.pin_memory = int(seed), int(rank), int(world_size), pin_memory
        self.epoch = 0
        self.batches = 0  # micro-batches of this rank consumed in the current epoch
        self.positions: dict[int, tuple[int, int]] = {}  # worker → (slot, member) last consumed
        self._iterator: Iterator[dict[str, Any]] | None = None
        self._skip = 0  # generic resume: batches of the reopened epoch to drop
        if hasattr(data, "check_stream_split"):
            data.check_stream_split(self.world_size, self.num_workers)

    @property
    def positional(self) -> bool:
        """Whether the data set resumes by position (``set_stream_start``)."""
        return hasattr(self.data, "set_stream_start")

    # -- reading --------------------------------------------------------------------------
    def _open(self) -> Iterator[dict[str, Any]]:
        if hasattr(self.data, "set_epoch"):
            self.data.set_epoch(self.epoch)  # before iter(): workers copy the data set then
        if self.positional and self.positions:
            self.data.set_stream_start({w: (slot, member + 1) for w, (slot, member) in self.positions.items()})
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch * 7919 + self.rank)
        loader = DataLoader(self.data, batch_size=self.batch_size, drop_last=True, num_workers=self.num_workers,
                            generator=generator, collate_fn=collate_samples, pin_memory=self.pin_memory)
        iterator = iter(loader)
        skip, self._skip = self._skip, 0
        for _ in range(skip):  # generic resume: the consumed batches, read again and dropped
            if next(iterator, None) is None:
                break
        return iterator

    def next_batch(self) -> dict[str, Any]:
        """The next micro-batch (starting the next epoch when this one is used up)."""
        while True:
            fresh = self._iterator is None and self.batches == 0
            if self._iterator is None:
                self._iterator = self._open()
            batch = next(self._iterator, None)
            if batch is not None:
                self.batches += 1
                self._record(batch)
                return batch
            self._iterator = None
            if fresh:
                raise StreamEpochError(
                    f"epoch {self.epoch} of the training stream gave rank {self.rank} no full batch of "
                    f"Trainer.batch_size={self.batch_size} (with {max(self.num_workers, 1)} loader worker(s), "
                    "each worker batches its own samples and drops its last partial batch). Check the "
                    "data set's shards and bad-sample counts, or lower the batch size or the number of workers.")
            self.epoch, self.batches, self.positions = self.epoch + 1, 0, {}

    def micro_batches(self, n: int) -> list[dict[str, Any]]:
        return [self.next_batch() for _ in range(n)]

    def _record(self, batch: dict[str, Any]) -> None:
        """Note where the consumed samples come from (the field leaves the batch)."""
        pos = batch.pop(POSITION_FIELD, None)
        if not isinstance(pos, torch.Tensor) or pos.dim() != 2 or pos.shape[1] != 3:
            return
        for worker, slot, member in pos.tolist():  # a shuffle buffer mixes the order: keep the furthest
            if (slot, member) > self.positions.get(worker, (-1, -1)):
                self.positions[worker] = (slot, member)

    def close(self) -> None:
        """Stop the loader's workers (a new epoch or a resume reopens it)."""
        self._iterator = None

    # -- checkpoint -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """This rank's position (JSON-ready); the trainer stores every rank's."""
        return {"epoch": self.epoch, "batches": self.batches, "num_workers": self.num_workers,
                "world_size": self.world_size, "batch_size": self.batch_size,
                "positions": {str(w): list(p) for w, p in sorted(self.positions.items())}}

    def load_state_dict(self, states: Sequence[Mapping[str, Any]]) -> None:
        """Continue from every rank's saved state (this rank takes its own).

        With the same world size, batch size and worker count the stream continues exactly
        where this rank stopped. Otherwise shards and batches map to ranks and workers
        differently: the run restarts the earliest saved epoch from its beginning (samples of
        it may be seen twice, none is skipped) and warns.
        """
        self.close()
        states = list(states)
        mine = states[self.rank] if self.rank < len(states) else None
        same = (mine is not None and len(states) == self.world_size
                and all(int(s.get(k, v)) == v for s in states
                        for k, v in (("num_workers", self.num_workers), ("batch_size", self.batch_size))))
        if not same:
            epoch = min(int(s.get("epoch", 0)) for s in states) if states else 0
            warnings.warn(
                f"resuming a streamed run with {self.world_size} rank(s) × {self.num_workers} worker(s), batch "
                f"{self.batch_size} (saved: {len(states)} rank(s) × {[s.get('num_workers') for s in states][:1]} "
                f"worker(s), batch {[s.get('batch_size') for s in states][:1]}): the stream restarts epoch "
                f"{epoch} from its start, so part of it is seen twice", stacklevel=2)
            self.epoch, self.batches, self.positions = epoch, 0, {}
            return
        self.epoch, self.batches = int(mine["epoch"]), int(mine["batches"])
        self.positions = {int(w): (int(p[0]), int(p[1])) for w, p in (mine.get("positions") or {}).items()}
        # Without positions the consumed batches are dropped when the epoch is reopened.
        self._skip = 0 if (self.positional and self.positions) else self.batches


# ---------------------------------------------------------------------------------------
# Evaluation on either kind of data set
# ---------------------------------------------------------------------------------------


def eval_loader(data: Dataset, *, batch_size: int, num_workers: int, rank: int, world_size: int) -> DataLoader:
    """A loader over ``data`` once, in order: map-style data is split across ranks by a
    ``DistributedSampler``; a stream is read as it is (a ``webdataset`` splits its shards
    across ranks itself)."""
    sampler = None if is_stream(data) else DistributedSampler(data, num_replicas=world_size, rank=rank,
                                                              shuffle=False)
    return DataLoader(data, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      collate_fn=collate_samples)


def first_samples(data: Dataset, n: int) -> list[dict[str, Any]]:
    """The first ``n`` samples (fewer when the data set is smaller), by index or from the stream."""
    if is_stream(data):
        return list(itertools.islice(iter(data), n))
    return [data[i] for i in range(min(n, len(data)))]


__all__ = ["POSITION_FIELD", "StreamEpochError", "TrainStream", "eval_loader", "first_samples", "is_stream"]
