"""Batches as the trainer receives them: collated so that bad captions survive collation (to
be named, not to crash ``default_collate``), and — with ``Trainer.skip_bad_samples`` — the
samples whose caption cannot be trained on dropped and counted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import default_collate

from lgvq_plugins.guidance.inputs import (
    bad_captions,
    dataset_indices,
    describe_positions,
)
from lgvq_plugins.training import distributed as D

#: sample fields collated as plain lists whatever their values (None, numbers, strings):
#: the guided model checks captions and names the bad ones.
TEXT_FIELDS = ("caption",)


def collate_samples(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``default_collate``, except that text fields stay lists as they are (a missing or
    ``None`` caption would otherwise stop ``default_collate`` with a TypeError that names
    no sample, and number captions would silently become a tensor)."""
    text = {k: [s.get(k) for s in samples] for k in TEXT_FIELDS if any(k in s for s in samples)}
    rest = default_collate([{k: v for k, v in s.items() if k not in text} for s in samples])
    return {**rest, **text}


def _batch_size(batch: Mapping[str, Any]) -> int:
    image = batch.get("image")
    if isinstance(image, Tensor):
        return int(image.shape[0])
    return len(batch["caption"])


def _select(value: Any, keep: list[int], size: int) -> Any:
    """``value`` restricted to the samples ``keep`` when it holds one entry per sample."""
    if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == size:
        return value[torch.tensor(keep, dtype=torch.long, device=value.device)]
    if isinstance(value, (list, tuple)) and len(value) == size:
        return type(value)(value[i] for i in keep)
    return value


def drop_bad_samples(batch: Mapping[str, Any], device: torch.device | str | None = None
                     ) -> tuple[dict[str, Any], int]:
    """The batch without the samples whose caption is not a non-empty string, and how many
    bad samples were dropped (summed over ranks under DDP). Without a ``caption`` field
    nothing is dropped.

    Under DDP every rank must keep the same number of samples (the contrastive loss gathers
    equal-sized batches), so each rank then keeps the first ``min over ranks`` good ones:
    a few good samples may go unused on the other ranks; only bad ones are counted.

    ``device``: where the counts go for the collective (the trainer's device: NCCL needs
    CUDA tensors); default :func:`~lgvq_plugins.training.distributed.default_device`.

    Raises:
        ValueError: when every sample of the batch is bad (on any rank) — nothing to train
            on, and a sign of a broken data set rather than a few bad samples.
    """
    captions = batch.get("caption")
    size = _batch_size(batch)
    problems = bad_captions(captions) if captions is not None else {}
    keep = [i for i in range(size) if i not in problems]
    count, dropped = len(keep), len(problems)
    if D.is_distributed():
        device = device if device is not None else D.default_device()
        least = torch.tensor([count], device=device)
        torch.distributed.all_reduce(least, op=torch.distributed.ReduceOp.MIN)
        total = D.all_reduce_sum(torch.tensor([dropped], device=device))
        count, dropped = int(least.item()), int(total.item())
    if count == 0:
        where = describe_positions(problems, dataset_indices(batch)) if problems else "on another rank"
        raise ValueError(f"Trainer.skip_bad_samples: every sample of this batch has a bad caption "
                         f"({where}); the data set looks broken — check its 'caption' field")
    keep = keep[:count]
    if len(keep) == size:
        return dict(batch), dropped
    return {k: _select(v, keep, size) for k, v in batch.items()}, dropped


__all__ = ["TEXT_FIELDS", "collate_samples", "drop_bad_samples"]
