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
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import gin
import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from . import checkpoint as ckpt_io
from . import distributed as D
from .interfaces import GuidedOutput, LossOutput
from .logging_utils import MetricsLogger, to_float


#: log entries shown on the progress bar (tokenizers name their reconstruction term differently)
_PROGRESS_KEYS = ("loss", "rec_loss", "rec", "q_usage", "disc_loss", "images_per_sec")


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or Inf; training stopped before any update used it."""


class ConfigMismatchError(RuntimeError):
    """A run directory's checkpoint was made with a different configuration."""


# ---------------------------------------------------------------------------------------
# Process group and seeding
# ---------------------------------------------------------------------------------------


def setup_distributed(backend: str | None = None) -> bool:
    """Initialise ``torch.distributed`` from torchrun's environment when ``WORLD_SIZE > 1``.

    gloo on CPU, NCCL on GPU (unless ``backend`` says otherwise). Returns True when running
    distributed. Safe to call twice.
    """
    if D.is_distributed():
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


# ---------------------------------------------------------------------------------------
# Data order that survives a restart
# ---------------------------------------------------------------------------------------


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


def _to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, Tensor) else v) for k, v in batch.items()}


# ---------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------


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


def _average_gradients(params: Sequence[nn.Parameter]) -> None:
    """Mean of the gradients over ranks in one flat all-reduce (missing grads count as 0)."""
    if not D.is_distributed() or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    D.all_reduce_mean(flat)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def codebook_fingerprint(codebook: Tensor) -> str:
    """SHA-256 of a codebook's float32 bytes (equal fingerprints ⇔ bit-identical codebooks)."""
    data = codebook.detach().float().cpu().contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------


@gin.configurable(denylist=["model", "train_data", "val_data", "out_dir", "config_hash", "config_lines"])
class Trainer:
    """Trains a ``LanguageGuided`` model (or anything with ``.tokenizer`` whose forward is
    ``(images, captions, batch) -> GuidedOutput``).

    Args:
        model: the generator side; ``model.tokenizer`` is the wrapped tokenizer.
        train_data / val_data: map-style datasets of sample dicts (``image``, ``caption`` ...).
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
    ):
        _check_positive(max_steps=max_steps, batch_size=batch_size, grad_accum_steps=grad_accum_steps,
                        num_samples=num_samples, keep_last=keep_last)
        if precision not in {"auto", "bf16", "fp32"}:
            raise ValueError(f"Trainer.precision must be 'auto', 'bf16' or 'fp32', got {precision!r}")
        if not hasattr(model, "tokenizer"):
            raise TypeError(f"Trainer needs a model with a .tokenizer (a LanguageGuided), got {type(model).__name__}")
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
        self.train_data = train_data
        self.val_data = val_data

        self.device = default_device() if device == "auto" else torch.device(device)
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" else "fp32"
        self.precision = precision
        self.world_size = D.world_size()
        self.rank = D.rank()
        self.is_main_process = self.rank == 0
        self.global_batch_size = self.batch_size * self.world_size

        self.model = model.to(self.device)
        self.tokenizer = model.tokenizer
        self.disc_params = [p for p in self.tokenizer.discriminator_parameters() if p.requires_grad]
        disc_ids = {id(p) for p in self.disc_params}
        self.disc_param_names = [n for n, p in self.model.named_parameters() if id(p) in disc_ids]
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
            "generator": _create_optimizer(self.gen_params, optimizer, self.lr, weight_decay, opt_kwargs)}
        if self.disc_params:
            self.optimizers["discriminator"] = _create_optimizer(self.disc_params, optimizer, self.disc_lr,
                                                                 weight_decay, opt_kwargs)
        self.schedulers = {name: _create_scheduler(opt, scheduler, self.max_steps, warmup_steps, min_lr)
                           for name, opt in self.optimizers.items()}

        # -- progress -------------------------------------------------------------------
        self.step = 0  # optimizer updates done
        self.epoch = 0
        self.batch_in_epoch = 0  # micro-batches of this rank consumed in the current epoch
        self.train_time = 0.0  # seconds spent in training steps (data loading included)
        self.images_seen = 0  # global
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
    def _train_loader(self, epoch: int, start_batch: int) -> DataLoader:
        if hasattr(self.train_data, "set_epoch"):
            self.train_data.set_epoch(epoch)
        sampler = ResumableSampler(self.train_data, shuffle=True, seed=self.seed, drop_last=True)
        sampler.set_epoch(epoch, start=start_batch * self.batch_size)
        # A private generator per (seed, epoch, rank): the loader never draws from the global
        # RNG, and worker seeds do not depend on whether the run was restarted.
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch * 7919 + self.rank)
        return DataLoader(self.train_data, batch_size=self.batch_size, sampler=sampler, drop_last=True,
                          num_workers=self.num_workers, generator=generator,
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

    def fit(self) -> dict[str, float]:
        """Train until ``max_steps`` (continuing from the current step after :meth:`resume`).

        Returns a summary: steps, epochs, images seen, training time and throughput.
        """
        from tqdm.auto import tqdm

        per_epoch = self._micro_batches_per_epoch()
        self.model.train()
        bar = tqdm(total=self.max_steps, initial=self.step, desc="train", dynamic_ncols=True,
                   disable=not (self.progress and self.is_main_process))
        window_images, window_time = 0, 0.0
        try:
            while self.step < self.max_steps:
                if self.batch_in_epoch >= per_epoch:
                    self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                loader = iter(self._train_loader(self.epoch, self.batch_in_epoch))
                while self.step < self.max_steps and self.batch_in_epoch < per_epoch:
                    t0 = time.perf_counter()
                    micro = [next(loader) for _ in range(self.grad_accum_steps)]
                    logs = self.train_step(micro)
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    dt = time.perf_counter() - t0
                    self.batch_in_epoch += self.grad_accum_steps
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
                        self.logger.log(self.step, {**logs, "epoch": self.epoch})
                    if self.val_every and self.step % self.val_every == 0 and self.step < self.max_steps:
                        self.validate()
                    if self.ckpt_every and self.step % self.ckpt_every == 0 and self.step < self.max_steps:
                        self.save_checkpoint()
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
            batch = _to_device(raw, self.device)
            last = i == n - 1
            sync = contextlib.nullcontext() if (last or self.ddp_model is self.model) else self.ddp_model.no_sync()
            with sync:
                with self.autocast():
                    guided: GuidedOutput = self.ddp_model(batch["image"], batch["caption"], batch)
                    # The unwrapped tokenizer: its objective may run the discriminator, which
                    # must not train here (frozen) and is not part of the DDP module.
                    with frozen(self.disc_params):
                        gen: LossOutput = self.tokenizer.generator_loss(batch["image"], guided.reconstruction,
                                                                         guided.quantized, step)
                        total = gen.loss + sum(guided.losses.values(), torch.zeros((), device=gen.loss.device))
                self._check_finite(step, total, gen, guided.losses)
                with frozen(self.disc_params):
                    (total / n).backward()
            disc: LossOutput | None = None
            if self.disc_params:
                with self.autocast():
                    disc = self.tokenizer.discriminator_loss(batch["image"], guided.reconstruction.detach(), step)
                if disc is not None:
                    self._check_finite(step, disc.loss, disc, {}, side="discriminator")
                    if disc.loss.requires_grad:
                        (disc.loss / n).backward()
            _accumulate(sums, "loss", total)
            for k, v in gen.logs.items():
                _accumulate(sums, k, v)
            for k, v in guided.raw_losses.items():
                _accumulate(sums, f"lg_{k}", v)
            for k, v in guided.quantized.stats.items():
                _accumulate(sums, f"q_{k}", v)
            if disc is not None:
                _accumulate(sums, "disc_loss", disc.loss)
                for k, v in disc.logs.items():
                    _accumulate(sums, f"disc_{k}" if not k.startswith("disc") else k, v)

        if self.clip_grad_norm:
            sums["grad_norm"] = n * to_float(torch.nn.utils.clip_grad_norm_(self.gen_params, self.clip_grad_norm))
        self.optimizers["generator"].step()
        if "discriminator" in self.optimizers:
            _average_gradients(self.disc_params)
            if self.clip_grad_norm:
                torch.nn.utils.clip_grad_norm_(self.disc_params, self.clip_grad_norm)
            self.optimizers["discriminator"].step()
        self.step += 1
        logs = {k: v / n for k, v in sums.items()}
        logs["lr"] = self.optimizers["generator"].param_groups[0]["lr"]
        return logs

    def _check_finite(self, step: int, total: Tensor, out: LossOutput, extra: Mapping[str, Tensor],
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
            f"Training stopped before the update; the last good checkpoint in {self.ckpt_dir} is untouched. "
            "Try a lower learning rate (Trainer.base_lr), gradient clipping (Trainer.clip_grad_norm) "
            "or fp32 (Trainer.precision = 'fp32').")

    # ------------------------------------------------------------------------------------
    # Evaluation
    # ------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, data: Dataset | None = None, max_batches: int | None = None) -> dict[str, float]:
        """Reconstruction metrics of the tokenizer on ``data`` (default: the validation set):
        ``psnr``, ``rec_loss`` (mean L1), ``mse``, ``codebook_usage``, ``perplexity``.

        Every rank evaluates its shard; the numbers are reduced over ranks.
        """
        from .metrics import PSNR, CodebookUsage

        data = data if data is not None else self.val_data
        if data is None:
            return {}
        was_training = self.model.training
        self.model.eval()
        psnr = PSNR().to(self.device)
        usage = CodebookUsage(self.tokenizer.quantizer.num_codes).to(self.device)
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # L1 sum, SE sum, pixels
        sampler = DistributedSampler(data, num_replicas=self.world_size, rank=self.rank, shuffle=False)
        loader = DataLoader(data, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers)
        try:
            for i, raw in enumerate(loader):
                if max_batches is not None and i >= max_batches:
                    break
                x = raw["image"].to(self.device)
                with self.autocast():
                    rec, quantized = self.tokenizer(x)
                rec = rec.float()
                psnr.update(rec, x)
                usage.update(quantized.indices)
                diff = (rec - x).double()
                sums += torch.stack([diff.abs().sum(), diff.pow(2).sum(),
                                     torch.tensor(float(diff.numel()), dtype=torch.float64, device=self.device)])
        finally:
            self.model.train(was_training)
        D.all_reduce_sum(sums)
        codes = usage.compute()
        return {"psnr": to_float(psnr.compute()), "rec_loss": to_float(sums[0] / sums[2].clamp_min(1)),
                "mse": to_float(sums[1] / sums[2].clamp_min(1)),
                "codebook_usage": to_float(codes["usage"]), "perplexity": to_float(codes["perplexity"])}

    def validate(self) -> dict[str, float]:
        """Periodic validation: metrics on ``val_batches`` batches, logged, plus a sample grid."""
        if self.val_data is None:
            return {}
        metrics = self.evaluate(max_batches=self.val_batches)
        self.logger.log(self.step, metrics, split="val")
        if self.is_main_process:
            self.save_samples()
        return metrics

    @torch.no_grad()
    def save_samples(self, path: str | os.PathLike[str] | None = None) -> Path:
        """Originals (top row) above their reconstructions (bottom row) as one PNG."""
        from torchvision.utils import save_image

        path = Path(path) if path is not None else self.samples_dir / f"step_{self.step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        n = min(self.num_samples, len(self.val_data))
        x = torch.stack([self.val_data[i]["image"] for i in range(n)]).to(self.device)
        was_training = self.model.training
        self.model.eval()
        try:
            with self.autocast():
                rec, _ = self.tokenizer(x)
        finally:
            self.model.train(was_training)
        grid = torch.cat([x, rec.float().clamp(-1, 1)]).cpu()
        save_image(grid, str(path), nrow=n, normalize=True, value_range=(-1, 1))
        return path

    # ------------------------------------------------------------------------------------
    # Checkpoints
    # ------------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path | None:
        """Write a checkpoint of the current step (rank 0; every rank's RNG state included)."""
        rng = ckpt_io.get_rng_state(self.model)
        rngs = _all_gather_json(rng)
        path = None
        if self.is_main_process:
            state = self.model.state_dict()
            model_state, disc_state = ckpt_io.split_state_dict(state, self.disc_param_names)
            ck = ckpt_io.Checkpoint(
                model=model_state, discriminator=disc_state,
                optimizers={k: o.state_dict() for k, o in self.optimizers.items()},
                state={"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                       "images_seen": self.images_seen, "train_time_s": self.train_time,
                       "world_size": self.world_size, "batch_size": self.batch_size,
                       "grad_accum_steps": self.grad_accum_steps,
                       "schedulers": {k: (s.state_dict() if s is not None else None)
                                      for k, s in self.schedulers.items()},
                       "rng": rngs, "config_hash": self.config_hash, "config": self.config_lines})
            path = ckpt_io.save_checkpoint(self.ckpt_dir, ck, keep_last=self.keep_last)
        if D.is_distributed():
            dist.barrier()
        return path

    def check_resumable(self, path: str | os.PathLike[str] | None = None) -> ckpt_io.Checkpoint | None:
        """Load the latest checkpoint (or ``path``) and check that it was made with this
        configuration; raises :class:`ConfigMismatchError` naming the differing settings."""
        path = Path(path) if path is not None else self.ckpt_dir
        if ckpt_io.latest_checkpoint(path) is None and not (path / ckpt_io.STATE_FILE).is_file():
            return None
        ck = ckpt_io.load_checkpoint(path)
        saved_hash = ck.state.get("config_hash")
        if self.config_hash is not None and saved_hash is not None and saved_hash != self.config_hash:
            old, new = set(ck.state.get("config") or []), set(self.config_lines)
            changes = [f"  - {line}" for line in sorted(old - new)] + [f"  + {line}" for line in sorted(new - old)]
            detail = "\n".join(changes[:40]) or "  (the settings differ)"
            raise ConfigMismatchError(
                f"cannot resume {ck.path}: it was trained with a different configuration "
                f"(config hash {saved_hash[:12]} vs {self.config_hash[:12]} now). Differences "
                f"(- checkpoint, + now):\n{detail}\n"
                "Resume with the original gin files, or start a new run with another --name.")
        return ck

    def resume(self, path: str | os.PathLike[str] | None = None) -> int:
        """Restore model, optimizers, schedules, data position and RNG states from the latest
        checkpoint (or ``path``). Returns the step reached (0 when there is nothing to resume)."""
        ck = self.check_resumable(path)
        if ck is None:
            return 0
        merged = {**ck.model, **ck.discriminator}
        missing, unexpected = self.model.load_state_dict(merged, strict=False)
        if missing or unexpected:
            raise ckpt_io.CheckpointError(
                f"checkpoint {ck.path} does not fit the model: missing {sorted(missing)[:10]}, "
                f"unexpected {sorted(unexpected)[:10]}")
        for name, opt in self.optimizers.items():
            ckpt_io.load_optimizer_state(opt, ck, name)
        for name, sched in self.schedulers.items():
            saved = ck.state.get("schedulers", {}).get(name)
            if sched is not None and saved is not None:
                if saved.get("t_initial") == getattr(sched, "t_initial", None):
                    sched.load_state_dict(saved)
                # else: max_steps changed (a run-only setting) — keep the new schedule's length
        s = ck.state
        self.step, self.epoch, self.batch_in_epoch = int(s["step"]), int(s["epoch"]), int(s["batch_in_epoch"])
        self.images_seen, self.train_time = int(s.get("images_seen", 0)), float(s.get("train_time_s", 0.0))
        if int(s.get("world_size", self.world_size)) != self.world_size or int(s.get("batch_size", self.batch_size)) != self.batch_size:
            warnings.warn(f"resuming {ck.path} with world size {self.world_size} / batch {self.batch_size} "
                          f"(saved: {s.get('world_size')} / {s.get('batch_size')}): the data order differs "
                          "from an uninterrupted run", stacklevel=2)
            self.batch_in_epoch = 0
        rngs = s.get("rng") or []
        if rngs:
            ckpt_io.set_rng_state(rngs[self.rank] if self.rank < len(rngs) else rngs[0], self.model)
        return self.step

    # ------------------------------------------------------------------------------------
    # End of run
    # ------------------------------------------------------------------------------------
    def codebook_report(self) -> dict[str, Any]:
        """Fingerprint of the codebook on every rank: ``codebooks_identical`` is True when all
        ranks hold bit-identical codebooks; ``codebook_max_abs_diff`` the largest difference."""
        codebook = self.tokenizer.quantizer.codebook.detach().float().contiguous()
        if self.dump_codebooks:
            from safetensors.torch import save_file

            self.out_dir.mkdir(parents=True, exist_ok=True)
            save_file({"codebook": codebook.cpu().clone()}, str(self.out_dir / f"codebook_rank{self.rank}.safetensors"))
        gathered = D.all_gather_cat(codebook[None])  # (world, K, D)
        diff = (gathered - gathered[:1]).abs().max() if gathered.numel() else torch.zeros(())
        fingerprints = [codebook_fingerprint(c) for c in gathered]
        return {"codebook_sha256": fingerprints, "codebooks_identical": len(set(fingerprints)) == 1,
                "codebook_max_abs_diff": to_float(diff)}

    def close(self) -> None:
        self.logger.close()


# ---------------------------------------------------------------------------------------
# Factories
# ---------------------------------------------------------------------------------------


def _create_optimizer(params: list[nn.Parameter], name: str, lr: float, weight_decay: float,
                      kwargs: Mapping[str, Any]) -> torch.optim.Optimizer:
    from timm.optim import create_optimizer_v2

    return create_optimizer_v2(params, opt=name, lr=lr, weight_decay=weight_decay, **kwargs)


def _create_scheduler(optimizer: torch.optim.Optimizer, name: str | None, max_steps: int, warmup_steps: int,
                      min_lr: float):
    if name is None or str(name).lower() in {"none", "constant", ""}:
        return None
    from timm.scheduler import create_scheduler_v2

    base = optimizer.param_groups[0]["lr"]
    # Step-based: one "epoch" of the timm schedule is one optimizer update.
    sched, _ = create_scheduler_v2(optimizer, sched=name, num_epochs=max_steps, warmup_epochs=warmup_steps,
                                   warmup_lr=base / max(warmup_steps, 1), min_lr=min_lr,
                                   step_on_epochs=False, updates_per_epoch=1)
    return sched


def _all_gather_json(obj: Any) -> list[Any]:
    """Every rank's JSON-serialisable ``obj``, in rank order (JSON bytes in padded uint8
    tensors: nothing is pickled)."""
    if not D.is_distributed():
        return [obj]
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    data = torch.tensor(list(json.dumps(obj).encode("utf-8")), dtype=torch.uint8, device=device)
    length = torch.tensor([data.numel()], dtype=torch.int64, device=device)
    lengths = D.all_gather_cat(length).tolist()
    padded = torch.zeros(max(lengths), dtype=torch.uint8, device=device)
    padded[:data.numel()] = data
    chunks = D.all_gather_cat(padded[None])  # (world, max_len)
    return [json.loads(bytes(chunks[r, :n].cpu().tolist()).decode("utf-8")) for r, n in enumerate(lengths)]


def _accumulate(sums: dict[str, float], key: str, value: Any) -> None:
    try:
        sums[key] = sums.get(key, 0.0) + to_float(value)
    except (TypeError, ValueError, RuntimeError):
        pass  # a non-scalar log entry: not for the scalar logs


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"Trainer.{name} must be a positive integer, got {value!r}")
