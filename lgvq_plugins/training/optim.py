"""Optimizers and step-based schedules from timm, by name."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn


def create_optimizer(params: list[nn.Parameter], name: str, lr: float, weight_decay: float,
                     kwargs: Mapping[str, Any]) -> torch.optim.Optimizer:
    """A timm optimizer (``create_optimizer_v2``) by name."""
    from timm.optim import create_optimizer_v2

    return create_optimizer_v2(params, opt=name, lr=lr, weight_decay=weight_decay, **kwargs)


def create_scheduler(optimizer: torch.optim.Optimizer, name: str | None, max_steps: int, warmup_steps: int,
                     min_lr: float):
    """A timm schedule stepped once per optimizer update, or None for a constant rate."""
    if name is None or str(name).lower() in {"none", "constant", ""}:
        return None
    from timm.scheduler import create_scheduler_v2

    base = optimizer.param_groups[0]["lr"]
    # Step-based: one "epoch" of the timm schedule is one optimizer update.
    sched, _ = create_scheduler_v2(optimizer, sched=name, num_epochs=max_steps, warmup_epochs=warmup_steps,
                                   warmup_lr=base / max(warmup_steps, 1), min_lr=min_lr,
                                   step_on_epochs=False, updates_per_epoch=1)
    return sched
