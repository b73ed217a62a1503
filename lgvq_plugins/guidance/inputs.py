"""Checks of what a guided model is fed: images and captions that would otherwise train
silently on garbage (the string "None", an all-padding caption, a [0, 255] image) or fail
deep inside a convolution get an error that says what was expected and what arrived.

Used by :class:`~lgvq_plugins.guidance.LanguageGuided` on every forward, and by the trainer's
``skip_bad_samples`` option (:mod:`lgvq_plugins.training.batch_checks`) to drop bad samples
instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

#: how far outside [-1, 1] image values may stray: resampling (bicubic, antialiasing)
#: overshoots a little, while [0, 255] data is far outside and [0, 1] data cannot be told
#: from a bright [-1, 1] image (normalise it with ``x * 2 - 1``).
IMAGE_RANGE_TOLERANCE = 0.1

_EXPECTED = "(B, {c}, H, W) floating-point images with values in [-1, 1]"


def check_images(images: Any, channels: int = 3) -> None:
    """Raise when ``images`` is not a non-empty (B, channels, H, W) float tensor in [-1, 1].

    The message says what was expected and what arrived, with the usual fix. Costs one
    min/max over the batch (one device synchronisation).
    """
    expected = _EXPECTED.format(c=channels)
    if not isinstance(images, Tensor):
        raise TypeError(f"expected {expected}; got a {type(images).__name__}")
    if images.numel() == 0:
        raise ValueError(f"expected {expected}; got an empty batch (shape {tuple(images.shape)})")
    if images.dim() != 4:
        raise ValueError(f"expected {expected}; got a tensor of shape {tuple(images.shape)}")
    if images.shape[1] != channels:
        hint = (" — channels last? use x.permute(0, 3, 1, 2)" if images.shape[-1] == channels
                else " — convert grey or RGBA images to RGB in the data set")
        raise ValueError(f"expected {expected}; got {images.shape[1]} channels, shape "
                         f"{tuple(images.shape)}{hint}")
    if not images.is_floating_point():
        raise TypeError(f"expected {expected}; got dtype {images.dtype} — convert with "
                        "x.float() / 127.5 - 1")
    low, high = (float(v) for v in torch.aminmax(images.detach()))
    if not (low >= -1 - IMAGE_RANGE_TOLERANCE and high <= 1 + IMAGE_RANGE_TOLERANCE):
        hint = " — [0, 255] data? use x / 127.5 - 1" if high > 1 + IMAGE_RANGE_TOLERANCE else ""
        raise ValueError(f"expected {expected}; got values in [{low:.4g}, {high:.4g}]{hint}")


def caption_problem(caption: Any) -> str | None:
    """Why ``caption`` cannot be trained on (None when it can): not a string, or blank."""
    if not isinstance(caption, str):
        return f"a {type(caption).__name__} ({caption!r}), not a string"
    if not caption.strip():
        return f"empty ({caption!r})"
    return None


def bad_captions(captions: Sequence[Any]) -> dict[int, str]:
    """Batch position → problem, for every caption that cannot be trained on."""
    problems = {i: caption_problem(c) for i, c in enumerate(captions)}
    return {i: p for i, p in problems.items() if p is not None}


def dataset_indices(batch: Mapping[str, Any] | None) -> list[Any] | None:
    """The batch's ``index`` field (the data set index of each sample) as a list, if any."""
    index = None if batch is None else batch.get("index")
    if index is None:
        return None
    return index.tolist() if isinstance(index, Tensor) else list(index)


def describe_positions(problems: Mapping[int, str], indices: Sequence[Any] | None) -> str:
    """"batch position 2 (dataset index 17): empty ('')" for each problem, at most 5."""
    parts = []
    for position, problem in list(problems.items())[:5]:
        where = f"batch position {position}"
        if indices is not None and position < len(indices):
            where += f" (dataset index {indices[position]})"
        parts.append(f"{where}: {problem}")
    more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
    return "; ".join(parts) + more


def check_captions(captions: Sequence[Any], batch: Mapping[str, Any] | None = None) -> None:
    """Raise naming every caption that is not a non-empty string (batch position, and the
    data set index when the batch has an ``index`` field)."""
    problems = bad_captions(captions)
    if problems:
        raise ValueError(
            f"bad caption{'s' if len(problems) > 1 else ''} — "
            f"{describe_positions(problems, dataset_indices(batch))}. Every caption must be a "
            "non-empty string: fix the data set, or set `Trainer.skip_bad_samples = True` to "
            "skip such samples and count them.")


__all__ = ["IMAGE_RANGE_TOLERANCE", "bad_captions", "caption_problem", "check_captions", "check_images",
           "dataset_indices", "describe_positions"]
