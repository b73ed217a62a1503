"""Bad files in real data sets: one error type that names the file and what is wrong, and
a tally of what was skipped or converted (reported in the logs and in ``metrics.json``).

Readers check what is cheap when they are built (the image exists, its header reads, it is
large enough, it has a non-empty caption; a grayscale / CMYK / RGBA image is noted for
conversion) and find the rest (a truncated or corrupt payload) when the sample is loaded.
By default a bad file is an error; with ``skip_bad_samples=True`` on the data set it is
skipped, counted here and warned about once per kind.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: problem kinds, each with the fix the error message suggests
KINDS: dict[str, str] = {
    "missing_image": "the image file does not exist (check the root and the caption file's paths)",
    "corrupt_image": "the image cannot be decoded (corrupt file, or not an image)",
    "truncated_image": "the image file ends early (re-download or re-extract it)",
    "tiny_image": "the image is smaller than min_image_side (set a smaller min_image_side, or remove it)",
    "no_caption": "the image has no caption",
    "empty_caption": "the caption (or caption file) is empty",
    "bad_caption_record": "a caption record cannot be read (check the line's JSON / CSV columns)",
}

#: image modes converted to RGB (counted, never an error)
CONVERTED = "converted_to_rgb"


class BadSampleError(ValueError):
    """A file of a data set cannot be used. The message names the file and the problem, and
    says how to skip such files (``<dataset>.skip_bad_samples = True``)."""

    def __init__(self, dataset: str, path: str | Path, kind: str, detail: str = ""):
        self.dataset, self.path, self.kind, self.detail = dataset, str(path), kind, detail
        what = KINDS.get(kind, kind)
        extra = f" ({detail})" if detail else ""
        super().__init__(f"{dataset}: bad file {self.path}: {what}{extra}. Fix or remove it, or set "
                         f"`{dataset}.skip_bad_samples = True` to skip such files (they are counted "
                         "and reported in metrics.json)")


@dataclass
class ProblemTally:
    """What one data set object skipped and converted: counts per kind and a few examples."""

    dataset: str
    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    max_examples: int = 5

    def add(self, kind: str, path: str | Path, detail: str = "", *, warn: bool = True) -> None:
        """Count one problem; the first of each kind is logged as a warning."""
        self.counts[kind] += 1
        examples = self.examples.setdefault(kind, [])
        if len(examples) < self.max_examples:
            examples.append(f"{path}{': ' + detail if detail else ''}")
        if warn and self.counts[kind] == 1:
            what = "converted to RGB" if kind == CONVERTED else f"skipped ({KINDS.get(kind, kind)})"
            log.warning("%s: %s %s%s; further files of this kind are counted silently",
                        self.dataset, path, what, f" [{detail}]" if detail else "")

    def add_error(self, err: BadSampleError, *, warn: bool = True) -> None:
        self.add(err.kind, err.path, err.detail, warn=warn)

    @property
    def skipped(self) -> int:
        return sum(n for k, n in self.counts.items() if k != CONVERTED)

    def report(self) -> dict[str, Any]:
        """JSON-ready: ``{"skipped": n, "converted_to_rgb": n, "by_kind": {...}, "examples": {...}}``."""
        return {"skipped": self.skipped, "converted_to_rgb": int(self.counts.get(CONVERTED, 0)),
                "by_kind": dict(sorted(self.counts.items())),
                "examples": {k: list(v) for k, v in sorted(self.examples.items())}}


__all__ = ["CONVERTED", "KINDS", "BadSampleError", "ProblemTally"]
