"""A run folder's life cycle: never start over a previous run by accident, clear it when
asked (``Experiment.overwrite``), and leave nothing behind when a run fails to build.

A run folder "holds a run" as soon as it has any entry — checkpoints, but also logs,
samples or a ``config.gin`` of a run that stopped before its first checkpoint: starting
afresh there would mix two runs' logs and files, so it needs ``overwrite``.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from lgvq_plugins.training.checkpoint import latest_checkpoint


class RunDirectoryError(RuntimeError):
    """The run directory is in a state that the requested action would damage."""


def run_contents(run_dir: Path) -> list[str]:
    """Names of the entries of ``run_dir`` (empty when it does not exist)."""
    return sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []


def _shown(entries: list[str]) -> str:
    return ", ".join(entries[:6]) + (f" and {len(entries) - 6} more" if len(entries) > 6 else "")


def check_run_dir(run_dir: Path, root: Path, *, resume: bool, overwrite: bool) -> bool:
    """Raise :class:`RunDirectoryError` when the requested start would damage ``run_dir``
    (a folder strictly inside ``root``).

    Returns True when the folder must be cleared first (``overwrite`` of a previous run).
    """
    if Path(root).resolve() not in Path(run_dir).resolve().parents:
        # e.g. name '.' or '..': clearing "the run folder" would clear the root or above it
        raise RunDirectoryError(f"Experiment.name must name a folder inside Experiment.root ({root}), "
                                f"got {run_dir}")
    entries = run_contents(run_dir)
    has_checkpoint = latest_checkpoint(run_dir / "checkpoints") is not None
    if resume:
        if has_checkpoint:
            return False
        if entries:
            raise RunDirectoryError(
                f"--resume: {run_dir} has no checkpoint to resume from; it holds {_shown(entries)} "
                "(a run stopped before its first checkpoint). Start it again with "
                "`Experiment.overwrite = True` (this deletes the folder's contents), or use another --name.")
        raise RunDirectoryError(f"--resume: {run_dir} has no checkpoint to resume from "
                                "(run without --resume to start it)")
    if not entries:
        return False
    if not overwrite:
        if has_checkpoint:
            raise RunDirectoryError(
                f"{run_dir} already holds a run with checkpoints ({_shown(entries)}). Pass --resume to "
                "continue it, --name to start another, or set `Experiment.overwrite = True` to replace it.")
        raise RunDirectoryError(
            f"{run_dir} already holds a run without a checkpoint ({_shown(entries)}; it stopped before "
            "its first checkpoint, so it cannot be resumed). Use --name to start another, or set "
            "`Experiment.overwrite = True` to replace it (this deletes the folder's contents).")
    return True


def prepare_run_dir(run_dir: Path, root: Path, *, resume: bool, overwrite: bool, main_process: bool,
                    barrier: Callable[[], None]) -> bool:
    """Check ``run_dir`` (every rank, before anyone writes), clear it on ``overwrite`` (the
    main process), and synchronise. Returns True when the folder holds nothing from before
    (new, empty or cleared): a run that then fails to build may remove it."""
    clear = check_run_dir(run_dir, root, resume=resume, overwrite=overwrite)
    fresh = not resume and (clear or not run_contents(run_dir))
    barrier()  # every rank has looked before the main process writes or deletes anything
    if clear and main_process:
        for entry in run_dir.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    barrier()
    return fresh


def discard_failed_run(run_dir: Path, *, fresh: bool, main_process: bool) -> None:
    """After a failed build: remove the folder of a run that never started (``fresh``).
    A resumed run's folder is kept whatever happened."""
    if fresh and main_process:
        shutil.rmtree(run_dir, ignore_errors=True)


__all__ = ["RunDirectoryError", "check_run_dir", "discard_failed_run", "prepare_run_dir", "run_contents"]
