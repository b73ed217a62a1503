"""Training :class:`~lgvq_plugins.second_stage.gpt.CodeGPT` on cached codes.

A small loop rather than the project's :class:`~lgvq_plugins.training.trainer.Trainer`:
that trainer is built around a tokenizer's generator/discriminator objectives and image
batches, while the second stage reads rows of cached code tensors. Checkpoints use the same
crash-safe format (:mod:`lgvq_plugins.training.checkpoint`: safetensors + JSON, ``latest``
pointer, pruning); with a ``checkpoint_dir`` the loop resumes from its latest checkpoint,
restoring weights, optimizer state, step and the batch-order generator, so a resumed run
ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import gin
from lgvq_plugins.training.checkpoint import (
    Checkpoint,
    latest_checkpoint,
    load_checkpoint,
    load_optimizer_state,
    save_checkpoint,
)


@gin.configurable("second_stage_training")
@dataclass(frozen=True)
class TrainSettings:
    """Budget of a second-stage run (gin: ``second_stage_training.steps = 2000``).

    Attributes:
        steps: AdamW updates.
        batch_size: sequences per update.
        lr, weight_decay: AdamW settings (betas 0.9, 0.95 as minGPT/taming).
        seed: seed of initialisation (by the caller) and of the batch order.
        checkpoint_every: steps between checkpoints (only with a checkpoint directory).
    """

    steps: int = 2000
    batch_size: int = 32
    lr: float = 3e-4
    weight_decay: float = 0.01
    seed: int = 0
    checkpoint_every: int = 500

    def protocol(self) -> dict[str, Any]:
        return asdict(self)


def train_code_gpt(model: nn.Module, codes: Tensor, settings: TrainSettings, *, prefix: Tensor | None = None,
                   prefix_mask: Tensor | None = None, checkpoint_dir: str | Path | None = None,
                   stop_at: int | None = None) -> dict[str, Any]:
    """Train ``model`` on ``codes`` (N, S) (with per-row ``prefix`` (N, P, C) and
    ``prefix_mask`` (N, P)); returns ``{"loss": last loss, "steps", "codes_per_s"}``.

    ``stop_at`` ends the loop early at that step (after checkpointing), as an interrupted
    run would; calling again with the same ``checkpoint_dir`` resumes.
    """
    device = next(model.parameters()).device
    codes = codes.reshape(codes.shape[0], -1).long()
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, betas=(0.9, 0.95),
                            weight_decay=settings.weight_decay)
    order = torch.Generator().manual_seed(settings.seed)
    step = 0
    if checkpoint_dir is not None and latest_checkpoint(checkpoint_dir) is not None:
        ckpt = load_checkpoint(checkpoint_dir)
        model.load_state_dict(ckpt.model)
        load_optimizer_state(opt, ckpt, "gpt")
        order.set_state(torch.tensor(ckpt.state["order_generator"], dtype=torch.uint8))
        step = ckpt.step
    model.train()
    loss = torch.tensor(float("nan"))
    start, seen = time.perf_counter(), 0
    end = settings.steps if stop_at is None else min(stop_at, settings.steps)
    with torch.enable_grad():  # tasks run under no_grad
        while step < end:
            idx = torch.randint(0, codes.shape[0], (settings.batch_size,), generator=order)
            batch = codes[idx].to(device)
            pre = prefix[idx].to(device) if prefix is not None else None
            pmask = prefix_mask[idx].to(device) if prefix_mask is not None else None
            loss = model.loss(batch, pre, pmask)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            seen += batch.numel()
            if checkpoint_dir is not None and (step % settings.checkpoint_every == 0 or step == end):
                save_checkpoint(checkpoint_dir, Checkpoint(
                    model=model.state_dict(), optimizers={"gpt": opt.state_dict()},
                    state={"step": step, "order_generator": order.get_state().tolist(),
                           "settings": settings.protocol(), "loss": float(loss.detach())}))
    model.eval()
    elapsed = time.perf_counter() - start
    return {"loss": float(loss.detach()), "steps": step, "codes_per_s": seen / elapsed if elapsed > 0 else None}


__all__ = ["TrainSettings", "train_code_gpt"]
