"""Launch a real multi-process job with torchrun (gloo on CPU) from a test."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Sequence


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: Sequence[str], *, nproc: int = 2, cwd: str | Path | None = None,
             timeout: float = 600, env: dict[str, str] | None = None,
             check: bool = True) -> subprocess.CompletedProcess:
    """Run ``torchrun --nproc_per_node nproc <args>``; raise with both ranks' output on failure
    (``check=False``: return the failed process instead, e.g. for a job killed on purpose).

    ``args`` is what follows torchrun's own options: a script path and its arguments, or
    ``-m module ...``.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}): {' '.join(cmd)}\n"
                             f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}")
    return proc


def one_and_two_processes(tmp_path: Path, worker_source: str, result_file: str,
                          timeout: float = 900) -> dict[int, dict]:
    """Run the worker script ``worker_source`` (argv: output folder, shared cache folder) with 1
    and then 2 torchrun processes; return ``{nproc: the JSON rank 0 wrote to result_file}``."""
    import json

    script = tmp_path / "worker.py"
    script.write_text(worker_source)
    cache = tmp_path / "cache"
    found = {}
    for nproc in (1, 2):
        out = tmp_path / f"n{nproc}"
        out.mkdir()
        torchrun([str(script), str(out), str(cache)], nproc=nproc, timeout=timeout)
        found[nproc] = json.loads((out / result_file).read_text())
    return found
