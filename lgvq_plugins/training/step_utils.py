"""Small pieces of one training step: device moves, frozen parameters, finite-loss checks,
scalar log sums and argument checks."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lgvq_plugins.interfaces import LossOutput
from lgvq_plugins.training import distributed as D
from lgvq_plugins.training.logs import to_float


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or Inf; training stopped before any update used it."""


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, Tensor) else v) for k, v in batch.items()}


@contextlib.contextmanager
def frozen(params: Sequence[nn.Parameter]) -> Iterator[None]:
    """Temporarily set ``requires_grad=False``: the graph built inside gets no edges to them."""
    previous = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, previous):
            p.requires_grad_(flag)


def check_finite(step: int, total: Tensor, out: LossOutput, extra: Mapping[str, Tensor], ckpt_dir: Path,
                 side: str = "generator") -> None:
    """Stop with a message naming the step and the loss term when anything is NaN/Inf.

    Under DDP every rank learns of a bad rank, so all stop together instead of hanging.
    """
    ok = torch.isfinite(total.detach()).all().float()
    if D.is_distributed():
        flag = ok.reshape(1).clone()
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        ok = flag[0]
    if bool(ok.item()):
        return
    terms = {**{k: v for k, v in out.logs.items()}, **dict(extra)}
    bad = [k for k, v in terms.items() if not math.isfinite(to_float(v))]
    where = ", ".join(repr(k) for k in bad) if bad else f"the total {side} loss"
    raise NonFiniteLossError(
        f"non-finite {side} loss at step {step + 1} (loss term {where}; total = {to_float(total)}). "
        f"Training stopped before the update; the last good checkpoint in {ckpt_dir} is untouched. "
        "Try a lower learning rate (Trainer.base_lr), gradient clipping (Trainer.clip_grad_norm) "
        "or fp32 (Trainer.precision = 'fp32').")


def balance_guidance(model: nn.Module, guided: Any, tokenizer_loss: Tensor) -> dict[str, Tensor]:
    """Let the model reweight its alignment terms against the tokenizer's objective before the
    backward (``LanguageGuided.balance = 'adaptive'``); returns scalars to log. ``{}`` for a
    model without ``balance_losses`` or with balancing off: ``guided.losses`` untouched."""
    balance = getattr(model, "balance_losses", None)
    return balance(guided, tokenizer_loss) if callable(balance) else {}


def accumulate(sums: dict[str, float], key: str, value: Any) -> None:
    try:
        sums[key] = sums.get(key, 0.0) + to_float(value)
    except (TypeError, ValueError, RuntimeError):
        pass  # a non-scalar log entry: not for the scalar logs


def check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"Trainer.{name} must be a positive integer, got {value!r}")
