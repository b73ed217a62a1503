"""Training second-stage models on cached tensors through the project's
:class:`~lgvq_plugins.training.trainer.Trainer`.

The second stage never touches the (frozen) tokenizer while it trains: its inputs are rows
of tensors extracted once — code indices, caption features, codebook vectors, word ids —
held by :class:`TensorRows`, a map-style data set whose sample ``i`` is row ``i`` of each.
:class:`Objective` is the adapter that makes a model and its loss a *generic* trainer model
(no ``.tokenizer``; ``forward(batch) -> LossOutput``), so the trainer's sampler, DDP,
checkpoints (atomic, ``latest``), exact resume (weights, optimizer, data position, RNG),
progress bar and ``logs/metrics.jsonl`` all apply unchanged.

:func:`train_code_gpt` trains a :class:`~lgvq_plugins.second_stage.gpt.CodeGPT` on code rows
(with a conditioning prefix per row); :func:`~lgvq_plugins.second_stage.heads.train_reader`
trains the understanding heads the same way. Under torchrun the models are wrapped in DDP
and the rows are sharded over ranks; ``second_stage_training.batch_size`` stays the *global*
batch (split over the ranks), so one process and N processes train with the same settings.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

import gin
from lgvq_plugins.interfaces import LossOutput
from lgvq_plugins.training import distributed as D
from lgvq_plugins.training.trainer import ConfigMismatchError, Trainer


@gin.configurable("second_stage_training")
@dataclass(frozen=True)
class TrainSettings:
    """Budget of a second-stage run (gin: ``second_stage_training.steps = 2000``).

    Attributes:
        steps: AdamW updates.  # steps
        batch_size: rows per update, over all ranks (each rank takes ``batch_size / world``).
        lr, weight_decay: AdamW settings (betas 0.9, 0.95 for the GPT, as minGPT/taming).
        seed: seed of the data order (the trainer's sampler, by epoch) and of the global RNG
            during training; the caller seeds the initialisation.
        checkpoint_every: steps between checkpoints (one is also written at the end).  # steps
        log_every: steps between records in ``logs/metrics.jsonl``.  # steps
        keep_last: checkpoints kept.
        progress: a progress bar on rank 0.
        tensorboard: TensorBoard event files next to ``metrics.jsonl``.
        precision: ``"auto"`` (bf16 autocast on GPU, fp32 on CPU), ``"bf16"`` or ``"fp32"``.
        clip_grad_norm: gradient-norm clipping (None: none, as before the trainer).
        num_workers: DataLoader workers (rows are in memory: 0 is usually fastest).
    """

    steps: int = 2000
    batch_size: int = 32
    lr: float = 3e-4
    weight_decay: float = 0.01
    seed: int = 0
    checkpoint_every: int = 500
    log_every: int = 50
    keep_last: int = 2
    progress: bool = True
    tensorboard: bool = False
    precision: str = "auto"
    clip_grad_norm: float | None = None
    num_workers: int = 0

    def protocol(self) -> dict[str, Any]:
        return asdict(self)


#: settings that change what is learned (checked on resume); the others only change how
#: long, how often or how visibly a run goes.
_IDENTITY = ("batch_size", "lr", "weight_decay", "seed", "precision", "clip_grad_norm")


class TensorRows(Dataset):
    """Map-style data set over row-aligned tensors: sample ``i`` is ``{name: tensor[i]}``.

    Args:
        **tensors: tensors with the same first dimension N (None values are left out).
    """

    def __init__(self, **tensors: Tensor | None):
        self.tensors = {k: v for k, v in tensors.items() if v is not None}
        if not self.tensors:
            raise ValueError("TensorRows needs at least one tensor")
        sizes = {k: int(v.shape[0]) for k, v in self.tensors.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"TensorRows: the tensors must have one row per sample, got rows {sizes}")
        self.n = next(iter(sizes.values()))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}={tuple(v.shape)}:{str(v.dtype).replace('torch.', '')}" for k, v in self.tensors.items())
        return f"TensorRows({shapes})"


class Objective(nn.Module):
    """A model and its loss on a batch of rows, as the trainer's generic model.

    ``forward(batch) -> LossOutput(loss_fn(model, batch))``. The trainer wraps this module in
    DDP, so the forward that DDP sees is the whole objective. Its state dict is the model's
    under the prefix ``model.``.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, Mapping[str, Tensor]], Tensor]):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Mapping[str, Tensor]) -> LossOutput:
        return LossOutput(self.loss_fn(self.model, batch))


def gpt_loss(model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    """Next-code cross-entropy of a CodeGPT on a batch of ``codes`` (+ ``prefix``, ``prefix_mask``)."""
    return model.loss(batch["codes"], batch.get("prefix"), batch.get("prefix_mask"))


def _config(model: nn.Module, rows: TensorRows, settings: TrainSettings, betas: tuple[float, float]
            ) -> tuple[str, list[str]]:
    """Identity of a run (checked on resume): architecture, row shapes, settings that matter."""
    lines = [f"model = {type(model).__name__}"]
    lines += [f"model.{k}.shape = {tuple(v.shape)}" for k, v in model.state_dict().items()]
    lines += [f"rows.{k}.shape = {tuple(v.shape[1:])}" for k, v in rows.tensors.items()]
    lines += [f"second_stage_training.{k} = {getattr(settings, k)!r}" for k in _IDENTITY]
    lines.append(f"betas = {tuple(betas)!r}")
    return hashlib.sha256(json.dumps(lines).encode()).hexdigest(), lines


@contextlib.contextmanager
def _private_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Seed the global RNGs for training and give the caller's states back afterwards: a
    resumed run restores the checkpoint's states, which must not leak into the caller."""
    py, npy = random.getstate(), np.random.get_state()
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


def _shared_run_dir(run_dir: str | Path | None) -> str | None:
    """Under torchrun, rank 0's run directory on every rank (only rank 0 writes; every rank
    must resume from the same checkpoint)."""
    value = str(run_dir) if run_dir is not None else None
    return D.all_gather_json(value)[0] if D.is_distributed() else value


def train_rows(model: nn.Module, loss_fn: Callable[[nn.Module, Mapping[str, Tensor]], Tensor],
               rows: TensorRows, settings: TrainSettings, *, run_dir: str | Path | None = None,
               betas: tuple[float, float] = (0.9, 0.95), stop_at: int | None = None) -> dict[str, Any]:
    """Train ``model`` on ``rows`` with the project's trainer (AdamW, constant ``lr``).

    Args:
        model: trained in place (on its own device); put in eval mode at the end.
        loss_fn: ``(model, batch) -> scalar loss`` on a collated batch of rows.
        rows: the cached inputs.
        settings: the budget (gin ``second_stage_training.*``).
        run_dir: where ``checkpoints/`` and ``logs/`` go; a run found there is resumed (or
            just loaded when it reached ``settings.steps``). None: a temporary directory
            (no resume). Under torchrun rank 0's is used on every rank.
        betas: AdamW betas.
        stop_at: end at that step (after a checkpoint), as an interrupted run would.

    Returns:
        ``{"loss": last loss (nan when no step ran here), "steps", "rows_per_s",
        "run_dir"}`` (throughput over the whole run, resumed parts included).
    """
    world = D.world_size()
    if settings.batch_size % world:
        raise ValueError(f"second_stage_training.batch_size = {settings.batch_size} is the global batch and must "
                         f"be divisible by the {world} processes of this torchrun job")
    if len(rows) < settings.batch_size:
        raise ValueError(f"{len(rows)} training rows are fewer than second_stage_training.batch_size = "
                         f"{settings.batch_size}; lower the batch size or train on more images")
    device = next(model.parameters()).device
    shared = _shared_run_dir(run_dir)
    with contextlib.ExitStack() as stack:
        out_dir = Path(shared) if shared is not None else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        config_hash, config_lines = _config(model, rows, settings, betas)
        with _private_rng(settings.seed, device):
            trainer = Trainer(
                Objective(model, loss_fn), rows, None, out_dir=out_dir, max_steps=settings.steps,
                batch_size=settings.batch_size // world, grad_accum_steps=1, base_lr=settings.lr, scale_lr=False,
                disc_lr_mult=1.0, optimizer="adamw", betas=tuple(betas), weight_decay=settings.weight_decay,
                optimizer_kwargs={}, scheduler=None, warmup_steps=0, min_lr=0.0,
                clip_grad_norm=settings.clip_grad_norm, precision=settings.precision, device=str(device),
                num_workers=settings.num_workers, seed=settings.seed, log_every=settings.log_every,
                val_every=None, val_batches=None, num_samples=1, ckpt_every=settings.checkpoint_every,
                keep_last=settings.keep_last, find_unused_parameters=False, broadcast_buffers=True,
                progress=settings.progress, tensorboard=settings.tensorboard, config_hash=config_hash,
                config_lines=config_lines, dump_codebooks=False, skip_bad_samples=False)
            if stop_at is not None:
                trainer.max_steps = min(int(stop_at), settings.steps)
            try:
                trainer.resume()
            except ConfigMismatchError as err:
                raise ConfigMismatchError(
                    f"the second-stage run in {out_dir} was trained with other settings; delete it or write "
                    f"the results somewhere else.\n{err}") from err
            try:
                with torch.enable_grad():  # tasks run under no_grad
                    summary = trainer.fit()
            finally:
                trainer.close()
                model.eval()
    return {"loss": float(trainer.last_train_logs.get("loss", float("nan"))), "steps": trainer.step,
            "rows_per_s": summary["train_images_per_sec"] or None,
            "run_dir": str(out_dir) if shared is not None else None}


def train_code_gpt(model: nn.Module, codes: Tensor, settings: TrainSettings, *, prefix: Tensor | None = None,
                   prefix_mask: Tensor | None = None, checkpoint_dir: str | Path | None = None,
                   stop_at: int | None = None) -> dict[str, Any]:
    """Train a CodeGPT ``model`` on ``codes`` (N, S) (with per-row ``prefix`` (N, P, C) and
    ``prefix_mask`` (N, P)) through the trainer; returns ``{"loss", "steps", "codes_per_s",
    "rows_per_s", "run_dir"}``.

    ``checkpoint_dir`` is the run directory (``checkpoints/``, ``logs/metrics.jsonl``); a run
    there is resumed. ``stop_at`` ends early at that step, as an interrupted run would.
    """
    codes = codes.reshape(codes.shape[0], -1).long()
    rows = TensorRows(codes=codes, prefix=prefix, prefix_mask=prefix_mask.bool() if prefix_mask is not None else None)
    stats = train_rows(model, gpt_loss, rows, settings, run_dir=checkpoint_dir, stop_at=stop_at)
    rate = stats["rows_per_s"]
    return {**stats, "codes_per_s": rate * codes.shape[1] if rate else None}


__all__ = ["Objective", "TensorRows", "TrainSettings", "gpt_loss", "train_code_gpt", "train_rows"]
