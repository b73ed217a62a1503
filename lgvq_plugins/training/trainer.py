"""The first-stage trainer: one forward per batch, generator + discriminator, one process or DDP.

Per optimizer step (``grad_accum_steps`` micro-batches each):

1. ``guided = model(images, captions, batch)`` — the only forward of the batch.
2. Generator objective ``tokenizer.generator_loss(x, rec, quantized, step) + Σ guided.losses``,
   backpropagated with the discriminator's parameters frozen, so the GAN term trains the
   generator only.
3. Discriminator objective on the *detached* reconstruction with its own optimizer
   (skipped when the tokenizer returns ``None``).

Under torchrun (``WORLD_SIZE > 1``) the generator side (the ``LanguageGuided`` module) is
wrapped in DDP with the discriminator's parameters excluded; the tokenizer's own
``generator_loss`` is called on the *unwrapped* tokenizer (it runs the discriminator, whose
parameters DDP must not see as generator parameters), and the discriminator's gradients
are averaged over ranks by an explicit all-reduce — the contract exposes its parameters, not
a module DDP could wrap. The global batch is ``batch_size × world size``.

Map-style data is sampled by index (:class:`~lgvq_plugins.data.sampler.ResumableSampler`,
epochs of equal length on every rank). An ``IterableDataset`` (``webdataset`` shards) is
streamed through :class:`~lgvq_plugins.training.stream.TrainStream`: no sampler, endless
per-rank epochs, training counted in steps, the stream's position saved in checkpoints.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import gin
import torch
from torch import nn
from torch.utils.data import Dataset

from lgvq_plugins.training import distributed as D
from lgvq_plugins.training.batch_checks import drop_bad_samples
from lgvq_plugins.contracts import check_implements
from lgvq_plugins.interfaces import GuidedOutput, LossOutput, Tokenizer
from lgvq_plugins.data.bad_samples import bad_file_counts
from lgvq_plugins.training.logs import MetricsLogger, to_float
from lgvq_plugins.training.optim import create_optimizer, create_scheduler
from lgvq_plugins.training.stream import TrainStream, is_stream
from lgvq_plugins.training.step_utils import (
    NonFiniteLossError, accumulate, balance_guidance, check_finite, check_positive, frozen, to_device,
)
from lgvq_plugins.training.trainer_data import TrainerData
from lgvq_plugins.training.trainer_eval import TrainerEvaluation, codebook_fingerprint
from lgvq_plugins.training.trainer_resume import ConfigMismatchError, TrainerCheckpoints


#: log entries shown on the progress bar (tokenizers name their reconstruction term differently)
_PROGRESS_KEYS = ("loss", "rec_loss", "rec", "q_usage", "disc_loss", "images_per_sec")


# ---------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------


@gin.configurable(denylist=["model", "train_data", "val_data", "out_dir", "config_hash", "config_lines"])
class Trainer(TrainerData, TrainerEvaluation, TrainerCheckpoints):
    """Trains a ``LanguageGuided`` model (or anything with ``.tokenizer`` whose forward is
    ``(images, captions, batch) -> GuidedOutput``), or a generic model without ``.tokenizer``
    whose forward is ``(batch) -> LossOutput`` (no discriminator; the second stage's priors
    and heads, through ``second_stage/objective.py``).

    Args:
        model: the generator side; ``model.tokenizer`` is the wrapped tokenizer.
        train_data / val_data: datasets of sample dicts (``image``, ``caption`` ...): map-style,
            or an ``IterableDataset`` streamed without a sampler (see the module docstring).
        out_dir: the run directory (``checkpoints/``, ``logs/``, ``samples/`` go inside).
        max_steps: optimizer updates to train for.  # steps
        batch_size: images per rank per micro-batch; the global batch is this × world size.
        grad_accum_steps: micro-batches per optimizer update.
        base_lr: learning rate per image when ``scale_lr`` (the reference: 4.5e-6), else the
            learning rate itself.
        scale_lr: ``lr = base_lr × batch_size × world size × grad_accum_steps`` (the reference).
        disc_lr_mult: discriminator lr = generator lr × this.
        optimizer: timm optimizer name (``create_optimizer_v2``), e.g. ``adam``, ``adamw``.
        betas: Adam betas (reference (0.5, 0.9)); passed to Adam-family optimizers only.
        weight_decay: weight decay of both optimizers.
        optimizer_kwargs: more keyword arguments for ``create_optimizer_v2``.
        scheduler: timm scheduler name (``create_scheduler_v2``), stepped per update, or
            ``None`` / ``"none"`` for a constant rate.
        warmup_steps: linear warm-up length.  # steps
        min_lr: floor of decaying schedules.
        clip_grad_norm: clip each side's gradient norm to this (None: no clipping).
        precision: ``"auto"`` (bf16 autocast on GPU, fp32 on CPU), ``"bf16"`` or ``"fp32"``.
        device: ``"auto"`` or a torch device string.
        num_workers: DataLoader worker processes.
        seed: data order (sampler shuffle seed, by epoch) and worker seeds.
        log_every / val_every / ckpt_every: intervals in steps (0 or None disables; a
            checkpoint and a validation are also made at the end).
        val_batches: batches per periodic validation (None: the whole split).
        num_samples: images in each reconstruction grid.
        keep_last: checkpoints kept (older ones are deleted).
        find_unused_parameters / broadcast_buffers: passed to DDP.
        progress: show a tqdm bar on rank 0.
        tensorboard: also write TensorBoard event files next to ``metrics.jsonl``.
        config_hash / config_lines: identity of the configuration (stored in checkpoints and
            checked on resume).
        dump_codebooks: at the end, each rank writes ``codebook_rank<r>.safetensors``.
        skip_bad_samples: drop samples whose caption is not a non-empty string and count
            them (``skipped_samples`` in the logs and ``metrics.json``) instead of stopping
            with an error that names them.
    """

    def __init__(
        self,
        model: nn.Module,
        train_data: Dataset,
        val_data: Dataset | None = None,
        *,
        out_dir: str | os.PathLike[str] = "runs/default",
        max_steps: int = 1000,
        batch_size: int = 8,
        grad_accum_steps: int = 1,
        base_lr: float = 4.5e-6,
        scale_lr: bool = True,
        disc_lr_mult: float = 1.0,
        optimizer: str = "adam",
        betas: tuple[float, float] = (0.5, 0.9),
        weight_decay: float = 0.0,
        optimizer_kwargs: Mapping[str, Any] | None = None,
        scheduler: str | None = "cosine",
        warmup_steps: int = 0,
        min_lr: float = 0.0,
        clip_grad_norm: float | None = None,
        precision: str = "auto",
        device: str = "auto",
        num_workers: int = 0,
        seed: int = 0,
        log_every: int | None = 10,
        val_every: int | None = 500,
        val_batches: int | None = 4,
        num_samples: int = 8,
        ckpt_every: int | None = 500,
        keep_last: int = 3,
        find_unused_parameters: bool = False,
        broadcast_buffers: bool = True,
        progress: bool = True,
        tensorboard: bool = True,
        config_hash: str | None = None,
        config_lines: Sequence[str] | None = None,
        dump_codebooks: bool = False,
        skip_bad_samples: bool = False,
    ):
        check_positive(max_steps=max_steps, batch_size=batch_size, grad_accum_steps=grad_accum_steps,
                        num_samples=num_samples, keep_last=keep_last)
        if precision not in {"auto", "bf16", "fp32"}:
            raise ValueError(f"Trainer.precision must be 'auto', 'bf16' or 'fp32', got {precision!r}")
        if hasattr(model, "tokenizer"):
            check_implements(model.tokenizer, Tokenizer, role="Trainer(model=...).tokenizer")
        elif val_data is not None:
            raise ValueError(f"Trainer: {type(model).__name__} has no .tokenizer (a generic model, forward(batch) "
                             "-> LossOutput); its validation is not the tokenizer's: pass val_data=None")
        self.out_dir = Path(out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.samples_dir = self.out_dir / "samples"
        self.max_steps = int(max_steps)
        self.batch_size = int(batch_size)
        self.grad_accum_steps = int(grad_accum_steps)
        self.clip_grad_norm = clip_grad_norm
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self.log_every = log_every or 0
        self.val_every = val_every or 0
        self.val_batches = val_batches
        self.num_samples = int(num_samples)
        self.ckpt_every = ckpt_every or 0
        self.keep_last = int(keep_last)
        self.progress = progress
        self.config_hash = config_hash
        self.config_lines = list(config_lines or [])
        self.dump_codebooks = dump_codebooks
        self.skip_bad_samples, self.skipped_samples = bool(skip_bad_samples), 0
        self.train_data = train_data
        self.val_data = val_data

        self.device = D.default_device() if device == "auto" else torch.device(device)
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" else "fp32"
        self.precision = precision
        self.world_size = D.world_size()
        self.rank = D.rank()
        self.is_main_process = self.rank == 0
        self.global_batch_size = self.batch_size * self.world_size

        self.model = model.to(self.device)
        self.tokenizer = getattr(model, "tokenizer", None)  # None: a generic model, no discriminator
        self.disc_params = ([p for p in self.tokenizer.discriminator_parameters() if p.requires_grad]
                            if self.tokenizer is not None else [])
        disc_ids = {id(p) for p in self.disc_params}
        self.disc_param_names = [n for n, p in self.model.named_parameters() if id(p) in disc_ids]
        # Buffers of the modules that hold discriminator weights (BatchNorm running statistics):
        # the discriminator is outside DDP, so rank 0's are broadcast after each update to keep
        # every rank's discriminator identical to the one that is checkpointed.
        self.disc_buffers = [b for m in self.model.modules()
                             if any(id(p) in disc_ids for p in m.parameters(recurse=False))
                             for b in m.buffers(recurse=False)]
        self.gen_params = [p for p in self.model.parameters() if p.requires_grad and id(p) not in disc_ids]
        if not self.gen_params:
            raise ValueError("the model has no trainable generator parameters")

        self.ddp_model: nn.Module = self.model
        if D.is_distributed():
            from torch.nn.parallel import DistributedDataParallel as DDP

            # The discriminator is trained by its own optimizer and synchronised separately;
            # DDP would otherwise expect its gradients from the generator's backward.
            DDP._set_params_and_buffers_to_ignore_for_model(self.model, self.disc_param_names)  # noqa: SLF001
            self.ddp_model = DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                                 find_unused_parameters=find_unused_parameters,
                                 broadcast_buffers=broadcast_buffers)

        # -- optimizers and schedules ----------------------------------------------------
        self.lr = base_lr * (self.global_batch_size * self.grad_accum_steps if scale_lr else 1)
        self.disc_lr = self.lr * disc_lr_mult
        opt_kwargs = dict(optimizer_kwargs or {})
        if "adam" in optimizer.lower() and "betas" not in opt_kwargs:
            opt_kwargs["betas"] = tuple(betas)
        self.optimizers: dict[str, torch.optim.Optimizer] = {
            "generator": create_optimizer(self.gen_params, optimizer, self.lr, weight_decay, opt_kwargs)}
        if self.disc_params:
            self.optimizers["discriminator"] = create_optimizer(self.disc_params, optimizer, self.disc_lr,
                                                                 weight_decay, opt_kwargs)
        self.schedulers = {name: create_scheduler(opt, scheduler, self.max_steps, warmup_steps, min_lr)
                           for name, opt in self.optimizers.items()}

        # -- progress -------------------------------------------------------------------
        self.step = 0  # optimizer updates done
        self.epoch = 0
        self.batch_in_epoch = 0  # micro-batches of this rank consumed in the current epoch
        self.train_time = 0.0  # seconds spent in training steps (data loading included)
        self.images_seen = 0  # global
        # A stream (IterableDataset) has its own per-rank epochs and position; self.epoch and
        # self.batch_in_epoch then mirror this rank's.
        self.stream: TrainStream | None = None
        if is_stream(train_data):
            self.stream = TrainStream(train_data, batch_size=self.batch_size, num_workers=self.num_workers,
                                      seed=self.seed, rank=self.rank, world_size=self.world_size,
                                      pin_memory=self.device.type == "cuda")
        self.last_train_logs: dict[str, float] = {}
        self.logger = MetricsLogger(self.out_dir / "logs", enabled=self.is_main_process, tensorboard=tensorboard)

    # ------------------------------------------------------------------------------------
    # Autocast
    # ------------------------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast when enabled (the quantizer keeps itself in fp32)."""
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ------------------------------------------------------------------------------------
    # Training
    # ------------------------------------------------------------------------------------
    def fit(self) -> dict[str, float]:
        """Train until ``max_steps`` (continuing from the current step after :meth:`resume`).

        Returns a summary: steps, epochs, images seen, training time and throughput.
        """
        from tqdm.auto import tqdm

        batches = self._streamed_micro_batches(self.stream) if self.stream else self._indexed_micro_batches()
        self.model.train()
        bar = tqdm(total=self.max_steps, initial=self.step, desc="train", dynamic_ncols=True,
                   disable=not (self.progress and self.is_main_process))
        window_images, window_time = 0, 0.0
        try:
            while self.step < self.max_steps:
                t0 = time.perf_counter()
                logs = self.train_step(next(batches))
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                dt = time.perf_counter() - t0
                images = self.global_batch_size * self.grad_accum_steps
                self.images_seen += images
                self.train_time += dt
                window_images += images
                window_time += dt
                logs["images_per_sec"] = images / max(dt, 1e-9)
                self.last_train_logs = logs
                bar.update(1)
                bar.set_postfix({k: f"{logs[k]:.4g}" for k in _PROGRESS_KEYS if k in logs}, refresh=False)
                if self.log_every and self.step % self.log_every == 0:
                    logs["images_per_sec"] = window_images / max(window_time, 1e-9)
                    window_images, window_time = 0, 0.0
                    self.logger.log(self.step, {**logs, **bad_file_counts(self.train_data), "epoch": self.epoch})
                if self.val_every and self.step % self.val_every == 0 and self.step < self.max_steps:
                    self.validate()
                if self.ckpt_every and self.step % self.ckpt_every == 0 and self.step < self.max_steps:
                    self.save_checkpoint()
            batches.close()  # a stream's loader workers stop before the final checkpoint
            self.save_checkpoint()
            if self.val_data is not None:
                self.validate()
        finally:
            bar.close()
            self.logger.flush()
        return self.summary()

    def summary(self) -> dict[str, float]:
        """Training totals so far (steps, epochs, images, time, images/s)."""
        return {"steps": float(self.step), "epochs": float(self.epoch), "images_seen": float(self.images_seen),
                "train_time_s": self.train_time,
                "train_images_per_sec": self.images_seen / max(self.train_time, 1e-9) if self.train_time else 0.0,
                "skipped_samples": float(self.skipped_samples),
                **{f"final_train_{k}": v for k, v in self.last_train_logs.items() if k != "images_per_sec"}}

    def train_step(self, micro_batches: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        """One optimizer update over ``micro_batches``; returns detached logs (means)."""
        step = self.step
        for name, sched in self.schedulers.items():
            if sched is not None:
                sched.step_update(step)
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        n = len(micro_batches)
        for i, raw in enumerate(micro_batches):
            if self.skip_bad_samples:
                raw, skipped = drop_bad_samples(raw, self.device)
                self.skipped_samples += skipped
            batch = to_device(raw, self.device)
            last = i == n - 1
            sync = contextlib.nullcontext() if (last or self.ddp_model is self.model) else self.ddp_model.no_sync()
            if self.tokenizer is None:  # a generic model: its forward(batch) is the whole objective
                with sync:
                    with self.autocast():
                        out = self.ddp_model(batch)
                    if not isinstance(out, LossOutput):
                        raise TypeError(f"Trainer: {type(self.model).__name__} has no .tokenizer, so its "
                                        f"forward(batch) must return a LossOutput, got {type(out).__name__}")
                    check_finite(step, out.loss, out, {}, self.ckpt_dir)
                    (out.loss / n).backward()
                for k, v in {**out.logs, "loss": out.loss}.items():
                    accumulate(sums, k, v)
                continue
            with sync:
                with self.autocast():
                    guided: GuidedOutput = self.ddp_model(batch["image"], batch.get("caption"), batch)
                    # The unwrapped tokenizer: its objective may run the discriminator, which
                    # must not train here (frozen) and is not part of the DDP module.
                    with frozen(self.disc_params):
                        gen: LossOutput = self.tokenizer.generator_loss(batch["image"], guided.reconstruction,
                                                                         guided.quantized, step)
                        balance_logs = balance_guidance(self.model, guided, gen.loss)  # {} unless adaptive
                        total = gen.loss + sum(guided.losses.values(), torch.zeros((), device=gen.loss.device))
                check_finite(step, total, gen, guided.losses, self.ckpt_dir)
                with frozen(self.disc_params):
                    (total / n).backward()
            disc: LossOutput | None = None
            if self.disc_params:
                with self.autocast():
                    disc = self.tokenizer.discriminator_loss(batch["image"], guided.reconstruction.detach(), step)
                if disc is not None:
                    check_finite(step, disc.loss, disc, {}, self.ckpt_dir, side="discriminator")
                    if disc.loss.requires_grad:
                        (disc.loss / n).backward()
            accumulate(sums, "loss", total)
            for k, v in gen.logs.items():
                accumulate(sums, k, v)
            for k, v in guided.raw_losses.items():
                accumulate(sums, f"lg_{k}", v)
            for k, v in balance_logs.items():
                accumulate(sums, k, v)
            for k, v in guided.quantized.stats.items():
                accumulate(sums, f"q_{k}", v)
            if disc is not None:
                accumulate(sums, "disc_loss", disc.loss)
                for k, v in disc.logs.items():
                    accumulate(sums, f"disc_{k}" if not k.startswith("disc") else k, v)

        if self.clip_grad_norm:
            sums["grad_norm"] = n * to_float(torch.nn.utils.clip_grad_norm_(self.gen_params, self.clip_grad_norm))
        self.optimizers["generator"].step()
        if "discriminator" in self.optimizers:
            D.average_gradients(self.disc_params)
            if self.clip_grad_norm:
                torch.nn.utils.clip_grad_norm_(self.disc_params, self.clip_grad_norm)
            self.optimizers["discriminator"].step()
            for buffer in self.disc_buffers:
                D.broadcast(buffer, src=0)
        self.step += 1
        logs = {k: v / n for k, v in sums.items()}
        logs["lr"] = self.optimizers["generator"].param_groups[0]["lr"]
        if self.skip_bad_samples:
            logs["skipped_samples"] = float(self.skipped_samples)  # since the start of this process
        return logs

    def close(self) -> None:
        self.logger.close()


__all__ = ["Trainer", "NonFiniteLossError", "ConfigMismatchError", "codebook_fingerprint", "frozen"]
