"""Process group, seeding and small collectives that are no-ops in a single process."""

from __future__ import annotations

import json
import os
import random
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main_process() -> bool:
    return rank() == 0


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """In-place sum over ranks (returns ``tensor`` for chaining)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: Tensor) -> Tensor:
    """In-place element-wise maximum over ranks."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def all_reduce_mean(tensor: Tensor) -> Tensor:
    """In-place mean over ranks."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= world_size()
    return tensor


def broadcast(tensor: Tensor, src: int = 0) -> Tensor:
    """In-place broadcast from ``src``."""
    if is_distributed():
        dist.broadcast(tensor, src=src)
    return tensor


def all_gather_cat(tensor: Tensor) -> Tensor:
    """Concatenate ``tensor`` (same shape on every rank) along dim 0, without gradient."""
    if not is_distributed():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def all_gather_cat_with_grad(tensor: Tensor) -> Tensor:
    """Like :func:`all_gather_cat`, but gradients flow back to this rank's slice (for
    contrastive losses whose negatives come from every rank)."""
    if not is_distributed():
        return tensor
    import torch.distributed.nn.functional as dist_fn

    return torch.cat(dist_fn.all_gather(tensor.contiguous()), dim=0)


def setup_distributed(backend: str | None = None) -> bool:
    """Initialise ``torch.distributed`` from torchrun's environment when ``WORLD_SIZE > 1``.

    gloo on CPU, NCCL on GPU (unless ``backend`` says otherwise). Returns True when running
    distributed. Safe to call twice.
    """
    if is_distributed():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend or ("nccl" if use_cuda else "gloo"))
    return True


def default_device() -> torch.device:
    """This rank's GPU when there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def average_gradients(params: Sequence[nn.Parameter]) -> None:
    """Mean of the gradients over ranks in one flat all-reduce (missing grads count as 0)."""
    if not is_distributed() or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    all_reduce_mean(flat)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def all_gather_json(obj: Any) -> list[Any]:
    """Every rank's JSON-serialisable ``obj``, in rank order (a list of one when not
    distributed). Sent as JSON text, so what arrives is plain data."""
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, json.dumps(obj))
    return [json.loads(text) for text in gathered]
