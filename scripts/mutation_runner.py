"""A fork server that makes one mutmut test run cost seconds instead of a full start-up.

    python scripts/mutation_runner.py serve SOCKET &     # imports torch & co. once
    python scripts/mutation_runner.py run SOCKET -- PYTEST ARGS   # mutmut's --runner

mutmut 2 starts its runner command once per mutant, and a fresh Python spends most of a short
test run importing torch, transformers, open_clip and timm. The server imports those
third-party libraries once — never ``lgvq_plugins`` itself, so each forked child imports the
(mutated) package fresh from disk — and forks one child per request that runs
``pytest.main(ARGS)``; the client exits with the child's exit status. The parent never runs a
tensor operation, so forking after ``import torch`` is safe.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys

# Heavy third-party imports of the package and its tests (never lgvq_plugins: see above).
PRELOAD = ("torch", "torch.nn.functional", "torchvision", "timm", "open_clip", "transformers", "einops",
           "torchmetrics", "gin", "pluggy", "safetensors.torch", "numpy", "PIL.Image", "pytest",
           "vector_quantize_pytorch", "tensorboard", "torch.utils.tensorboard")


def serve(path: str) -> None:
    import importlib

    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:  # an optional extra that is not installed: the child imports what it needs
            pass
    assert not any(m == "lgvq_plugins" or m.startswith("lgvq_") for m in sys.modules), "preloaded the package"
    if os.path.exists(path):
        os.unlink(path)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    print(f"mutation runner: serving on {path}", flush=True)
    while True:
        conn, _ = server.accept()
        with conn:
            request = json.loads(conn.makefile().readline())
            pid = os.fork()
            if pid == 0:  # child: a fresh import of the package under test
                server.close()
                conn.close()
                os.chdir(request["cwd"])
                sys.path[:0] = [*request["path"], request["cwd"]]  # as `python -m pytest` does
                sink = os.open(os.environ.get("MUTATION_RUNNER_LOG", os.devnull),
                               os.O_WRONLY | os.O_CREAT | os.O_APPEND)
                os.dup2(sink, 1)
                os.dup2(sink, 2)
                import pytest
                import torch

                # One intra-op thread: a pool created before the fork would not survive it,
                # and mutation runs are many small test processes on a shared machine anyway.
                torch.set_num_threads(1)

                code = 1
                try:
                    code = int(pytest.main(request["args"]))
                finally:
                    os._exit(code)
            code = _wait(pid, conn)
            try:
                conn.sendall(f"{code}\n".encode())
            except OSError:  # the client is gone (mutmut timed it out)
                pass


def _wait(pid: int, conn: socket.socket) -> int:
    """The child's exit code; kill the child if the client hangs up (mutmut's timeout killed
    it) or after MUTATION_TEST_TIMEOUT seconds, so an endless mutant never blocks the server."""
    import select
    import time

    deadline = time.monotonic() + float(os.environ.get("MUTATION_TEST_TIMEOUT", "600"))
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        readable, _, _ = select.select([conn], [], [], 0.05)
        if (readable and not conn.recv(1)) or time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return -signal.SIGKILL


def run(path: str, args: list[str]) -> int:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(path)
    extra = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    client.sendall((json.dumps({"cwd": os.getcwd(), "path": extra, "args": args}) + "\n").encode())
    reply = client.makefile().readline().strip()
    if not reply:  # the server died (or mutmut's timeout killed us): count as a failure
        return 3
    code = int(reply)
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "serve":
        serve(sys.argv[2])
    elif len(sys.argv) >= 4 and sys.argv[1] == "run" and sys.argv[3] == "--":
        raise SystemExit(run(sys.argv[2], sys.argv[4:]))
    else:
        raise SystemExit(__doc__)
