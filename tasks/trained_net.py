"""Small networks trained once per settings and cached on disk (the ``shapes`` probe and
segmenter): the cache path from a hash of the settings, an atomic write, and under
torchrun process 0 trains while the others wait and load."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lgvq_plugins.training import distributed as D


def settings_digest(settings: Mapping[str, Any]) -> str:
    """16 hex digits identifying ``settings`` (JSON with sorted keys)."""
    return hashlib.sha256(json.dumps(dict(settings), sort_keys=True).encode()).hexdigest()[:16]


def load_or_train(net: nn.Module, path: Path, settings: Mapping[str, Any],
                  fit: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Load ``net``'s weights from ``path``, training them first with ``fit`` when the file
    is missing; returns what ``fit`` reported (read back from the JSON beside the weights).

    Weights are read with ``weights_only=True`` (a cached file is data, never code)."""
    meta = path.with_suffix(".json")
    if not path.is_file() and D.is_main_process():
        info = fit()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(net.state_dict(), tmp)
        os.replace(tmp, path)  # atomic: a reader never sees half a file
        tmp_meta = meta.with_suffix(f".tmp{os.getpid()}")
        tmp_meta.write_text(json.dumps({"settings": dict(settings), **info}, indent=2))
        os.replace(tmp_meta, meta)
    if D.is_distributed():
        torch.distributed.barrier()
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return json.loads(meta.read_text()) if meta.is_file() else {}


def reset_parameters(net: nn.Module, seed: int) -> None:
    """Re-initialise every layer of ``net`` from ``seed`` (without touching the global RNG's
    state afterwards: call inside ``torch.random.fork_rng``)."""
    torch.manual_seed(seed)
    for m in net.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()


__all__ = ["load_or_train", "reset_parameters", "settings_digest"]
