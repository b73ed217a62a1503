"""Crash-safe file primitives for checkpoints and run files, and the crash-test seam.

Every helper here finishes a *filesystem step* (a file written and fsync'ed, a rename, a
folder created or removed) and then calls :func:`fs_step`. In normal use that only counts.

**Test seam.** With the environment variable ``LGVQ_CRASH_AT=<n>`` set, the ``n``-th step
of the process (counted from 1) kills the process with ``SIGKILL`` right after the step —
no ``finally`` blocks, no ``atexit`` handlers, no flushing, exactly like a power cut that
spared the disk or an OOM killer. ``tests/scripts/crash_worker.py`` runs a training job
once per step this way and checks that a fresh process always resumes to the weights of an
uninterrupted run. Setting :data:`fs_trace` to a list records each step's label, which is
how the test enumerates the steps. The cost outside tests is one counter increment and one
environment lookup per step (a few per checkpoint file).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import signal
import sys
import uuid
from pathlib import Path
from typing import Any, Mapping

from safetensors.torch import load_file, save_file
from torch import Tensor

#: name prefix of every temporary file or folder (swept by the next checkpoint save)
TMP_PREFIX = ".tmp-"
#: environment variable of the crash seam: SIGKILL this process after the n-th step
CRASH_ENV = "LGVQ_CRASH_AT"

#: filesystem steps completed by this process (the crash seam counts these)
fs_steps = 0
#: when a list, each step's label is appended (tests enumerate the kill points with it)
fs_trace: list[str] | None = None


def fs_step(label: str) -> None:
    """Record one completed filesystem step; the crash seam's kill point (see module doc)."""
    global fs_steps
    fs_steps += 1
    if fs_trace is not None:
        fs_trace.append(label)
    target = os.environ.get(CRASH_ENV)
    if target and int(target) == fs_steps:
        # SIGKILL, not an exception: a real kill runs no cleanup handler of ours.
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))


def fsync_path(path: Path) -> None:
    """Flush a file or folder entry to disk (folders matter: a rename lives in its parent)."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # some filesystems refuse to open folders; nothing more we can do
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically: a fsync'ed temporary file, then ``os.replace``.

    A reader sees the old content or the new one, never a mix or a truncated file.
    """
    path = Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{uuid.uuid4().hex[:8]}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    fs_step(f"write {tmp.name}")
    os.replace(tmp, path)
    fsync_path(path.parent)
    fs_step(f"rename {tmp.name} -> {path.name}")


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (see :func:`write_text_atomic`)."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True))


def save_tensors(tensors: Mapping[str, Tensor], path: str | os.PathLike[str]) -> None:
    """Save a flat name → tensor mapping as safetensors and fsync it.

    Tensors are moved to CPU and made independent (safetensors refuses tensors that share
    storage, e.g. tied weights; loading copies them back into every tied parameter). Not
    atomic by itself: callers write into a temporary folder.
    """
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    save_file(flat, str(path))
    fsync_path(Path(path))
    fs_step(f"write {Path(path).name}")


def load_tensors(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Read a safetensors file (CPU tensors); nothing is unpickled."""
    return load_file(str(path), device="cpu")


def make_dir(path: Path) -> None:
    """Create a folder (it must not exist) and record the step."""
    path.mkdir()
    fs_step(f"mkdir {path.name}")


def rename(src: Path, dst: Path) -> None:
    """``os.replace`` + fsync of the parent folder, recorded as one step."""
    os.replace(src, dst)
    fsync_path(dst.parent)
    fs_step(f"rename {src.name} -> {dst.name}")


def remove_tree(path: Path) -> None:
    """Delete a file or folder tree and record the step.

    Only ever called on names that no reader follows (temporaries, or folders first renamed
    aside), so a kill half-way through the deletion leaves nothing a reader could trip on.
    """
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
    fs_step(f"delete {path.name}")


# Linux renameat2(2) flag: swap two existing paths in one atomic step.
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux ``renameat2(RENAME_EXCHANGE)``).

    Returns False, having changed nothing, where the platform or the filesystem cannot do
    it; callers then fall back to a protocol that does not need it.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):  # glibc < 2.28, musl without it
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        fsync_path(b.parent)
        fs_step(f"exchange {a.name} <-> {b.name}")
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


__all__ = ["TMP_PREFIX", "CRASH_ENV", "fs_step", "fsync_path", "write_text_atomic", "write_json_atomic",
           "save_tensors", "load_tensors", "make_dir", "rename", "remove_tree", "exchange"]
