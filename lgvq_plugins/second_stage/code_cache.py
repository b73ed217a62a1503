"""Codes extracted once from a frozen tokenizer, and caption features once from a frozen
text encoder, stored as safetensors under a hash of what produced them.

The second stage trains on a frozen tokenizer, so re-encoding every image at every step
would only burn time (docs/benchmarks.md measures how much). :func:`cached_codes` encodes
a data set once (batched, ``no_grad``, the tokenizer in eval mode — no EMA or
re-anchoring), and stores ``indices`` (N, h, w) as
``<cache>/codes/<sha256(tokenizer weights, data settings)[:16]>.safetensors`` with a JSON
beside it. A different tokenizer (any weight changed) or different data settings get a
different file; the same ones read the file back without touching the tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lgvq_plugins.text.encoders import encoder_weights_sha256, weights_sha256
from lgvq_plugins.training.atomic_io import (
    load_tensors,
    save_tensors,
    write_json_atomic,
)

#: Environment variable overriding the cache folder (default ``~/.cache/lgvq_plugins``),
#: shared with the FID probe's cache.
CACHE_ENV = "LGVQ_CACHE_DIR"


def cache_root(override: str | os.PathLike[str] | None = None) -> Path:
    if override is not None:
        return Path(override)
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lgvq_plugins")


def data_settings(data: Dataset) -> dict[str, Any]:
    """What identifies a data set's samples: its class, ``repr`` (the built-in data sets
    print their settings) and length."""
    return {"class": f"{type(data).__module__}.{type(data).__qualname__}", "repr": repr(data), "len": len(data)}


def _key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _cached(path: Path, meta: dict[str, Any], compute: Callable[[], dict[str, Tensor]]) -> dict[str, Tensor]:
    if path.is_file():
        return load_tensors(path)
    tensors = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    save_tensors(tensors, tmp)
    os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
    write_json_atomic(path.with_suffix(".json"), meta)
    return tensors


def codes_path(tokenizer: nn.Module, data: Dataset, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where :func:`cached_codes` keeps ``data``'s codes under ``tokenizer``."""
    key = _key({"kind": "codes", "tokenizer": weights_sha256(tokenizer), "data": data_settings(data)})
    return cache_root(cache_dir) / "codes" / f"{key}.safetensors"


def cached_codes(tokenizer: nn.Module, data: Dataset, *, batch_size: int = 64,
                 cache_dir: str | os.PathLike[str] | None = None) -> Tensor:
    """Code indices (N, h, w) int64 of every image of ``data`` (sample key ``image``),
    encoded once by the frozen ``tokenizer`` and cached on disk."""
    path = codes_path(tokenizer, data, cache_dir)

    def compute() -> dict[str, Tensor]:
        device = next(tokenizer.parameters()).device
        was_training = tokenizer.training
        tokenizer.eval()
        out: list[Tensor] = []
        try:
            with torch.no_grad():
                for batch in DataLoader(data, batch_size=batch_size, shuffle=False):
                    out.append(tokenizer.encode(batch["image"].to(device).float()).indices.cpu())
        finally:
            tokenizer.train(was_training)
        return {"indices": torch.cat(out).long()}

    meta = {"tokenizer_sha256": weights_sha256(tokenizer), "data": data_settings(data)}
    return _cached(path, meta, compute)["indices"]


def cached_caption_features(encoder: Any, captions: list[str], *, batch_size: int = 64,
                            cache_dir: str | os.PathLike[str] | None = None) -> tuple[Tensor, Tensor]:
    """Per-token features (N, L, Dt) float32 and padding masks (N, L) bool (True: real
    token) of ``captions`` under the frozen text ``encoder``, computed once and cached."""
    ident = getattr(encoder, "identity", None) or encoder_weights_sha256(encoder)
    key = _key({"kind": "captions", "encoder": str(ident), "captions": captions})
    path = cache_root(cache_dir) / "caption_features" / f"{key}.safetensors"

    def compute() -> dict[str, Tensor]:
        feats, masks = [], []
        for i in range(0, len(captions), batch_size):
            f = encoder.encode_captions(captions[i: i + batch_size])
            length = f.token_feats.shape[1]
            feats.append(f.token_feats.float().cpu())
            masks.append(torch.arange(length)[None] < f.lengths.cpu()[:, None])
        width = max(f.shape[1] for f in feats)
        feats = [torch.nn.functional.pad(f, (0, 0, 0, width - f.shape[1])) for f in feats]
        masks = [torch.nn.functional.pad(m, (0, width - m.shape[1])) for m in masks]
        return {"features": torch.cat(feats), "mask": torch.cat(masks)}

    out = _cached(path, {"encoder": str(ident), "captions": len(captions)}, compute)
    return out["features"], out["mask"].bool()


__all__ = ["cache_root", "cached_caption_features", "cached_codes", "codes_path", "data_settings"]
