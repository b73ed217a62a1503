"""The trainer's checkpoint side: save, check the configuration, resume exactly."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch.distributed as dist

from lgvq_plugins.training import checkpoint as ckpt_io
from lgvq_plugins.training import distributed as D


class ConfigMismatchError(RuntimeError):
    """A run directory's checkpoint was made with a different configuration."""


class TrainerCheckpoints:
    """Mixed into :class:`~lgvq_plugins.training.trainer.Trainer`; uses its model,
    optimizers, schedulers and progress counters."""

    # ------------------------------------------------------------------------------------
    # Checkpoints
    # ------------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path | None:
        """Write a checkpoint of the current step (rank 0; every rank's RNG state included)."""
        rng = ckpt_io.get_rng_state(self.model)
        rngs = D.all_gather_json(rng)
        # A stream's position is per rank (its epochs are not aligned across ranks).
        streams = D.all_gather_json(self.stream.state_dict()) if self.stream is not None else None
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
                       "rng": rngs, "config_hash": self.config_hash, "config": self.config_lines,
                       **({"stream": streams} if streams is not None else {})})
            path = ckpt_io.save_checkpoint(self.ckpt_dir, ck, keep_last=self.keep_last)
        if D.is_distributed():
            dist.barrier()
        return path

    def check_resumable(self, path: str | os.PathLike[str] | None = None) -> ckpt_io.Checkpoint | None:
        """Load the latest checkpoint (or ``path``) and check that it was made with this
        configuration; raises :class:`ConfigMismatchError` naming the differing settings."""
        resolved = ckpt_io.resolve_checkpoint(Path(path) if path is not None else self.ckpt_dir)
        if resolved is None:
            return None
        ck = ckpt_io.load_checkpoint(resolved)
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
        if self.stream is not None:  # the stream continues where each rank stopped (or warns)
            self.stream.load_state_dict(s.get("stream") or [])
            self.epoch, self.batch_in_epoch = self.stream.epoch, self.stream.batches
        elif int(s.get("world_size", self.world_size)) != self.world_size or int(s.get("batch_size", self.batch_size)) != self.batch_size:
            warnings.warn(f"resuming {ck.path} with world size {self.world_size} / batch {self.batch_size} "
                          f"(saved: {s.get('world_size')} / {s.get('batch_size')}): the data order differs "
                          "from an uninterrupted run", stacklevel=2)
            self.batch_in_epoch = 0
        rngs = s.get("rng") or []
        if rngs:
            ckpt_io.set_rng_state(rngs[self.rank] if self.rank < len(rngs) else rngs[0], self.model)
        return self.step
