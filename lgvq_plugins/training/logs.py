"""Training logs: one JSON object per line (``logs/metrics.jsonl``) and TensorBoard events.

Only the main process writes; on other ranks :class:`MetricsLogger` is a no-op, so callers
need no ``if rank == 0`` around every log call.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Mapping

from torch import Tensor


def to_float(value: Any) -> float:
    """A Python float from a float, int or 0-d tensor (detached)."""
    if isinstance(value, Tensor):
        return float(value.detach().float().item())
    return float(value)


class MetricsLogger:
    """Append metrics to ``<log_dir>/metrics.jsonl`` and TensorBoard event files.

    Each record is ``{"step": int, "split": str, "time": unix seconds, <name>: float, ...}``;
    TensorBoard tags are ``<split>/<name>``.
    """

    def __init__(self, log_dir: str | Path, *, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.log_dir = Path(log_dir)
        self._writer = None
        self._jsonl = None
        if not enabled:
            return
        self.log_dir.mkdir(parents=True, exist_ok=True)
        # Appending keeps the history of a resumed run in one file.
        self._jsonl = open(self.log_dir / "metrics.jsonl", "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.log_dir))

    def log(self, step: int, values: Mapping[str, Any], *, split: str = "train") -> dict[str, float]:
        """Record ``values`` (floats or 0-d tensors) at ``step``; returns them as floats."""
        floats = {k: to_float(v) for k, v in values.items() if v is not None}
        if not self.enabled:
            return floats
        record = {"step": int(step), "split": split, "time": round(time.time(), 3)}
        # JSON has no NaN/Inf: write them as strings so the file stays valid JSON.
        record.update({k: (v if math.isfinite(v) else str(v)) for k, v in floats.items()})
        assert self._jsonl is not None
        self._jsonl.write(json.dumps(record, sort_keys=True) + "\n")
        self._jsonl.flush()
        if self._writer is not None:
            for k, v in floats.items():
                self._writer.add_scalar(f"{split}/{k}", v, global_step=step)
        return floats

    def flush(self) -> None:
        if self._jsonl is not None:
            self._jsonl.flush()
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a ``metrics.jsonl`` file back (for tests and reports)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
