"""Bad files in real data sets: one error type that names the file and what is wrong, and
a tally of what was skipped or converted (reported in the logs and in ``metrics.json``).

Readers check what is cheap when they are built (the image exists, its header reads, it is
large enough, it has a non-empty caption; a grayscale / CMYK / RGBA image is noted for
conversion) and find the rest (a truncated or corrupt payload) when the sample is loaded.
By default a bad file is an error; with ``skip_bad_samples=True`` on the data set it is
skipped, counted here and warned about once per kind.

Counting across processes: a DataLoader worker is a separate process, so a Python counter
incremented there never reaches the main process. :class:`SharedProblemTally` keeps its
counts (and a few example paths) in shared-memory tensors, one row per process slot (the
main process, then each worker), so what a worker finds is counted; :func:`merge_reports`
sums the reports of several ranks (gathered with ``all_gather_json``).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import get_worker_info

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


#: every kind a shared tally can count, in the order of its table's columns
TALLY_KINDS: tuple[str, ...] = (*KINDS, CONVERTED, "other")


class SharedProblemTally:
    """A :class:`ProblemTally` whose counts survive DataLoader worker processes.

    Counts live in a shared-memory table with one row per process slot: row 0 for the
    process that built the data set, row ``1 + id`` for DataLoader worker ``id`` (each row is
    written by one process only, so no increment is lost to a race). Up to
    ``max_examples`` example paths per row are kept in a shared byte table. Build it in the
    data set's ``__init__`` (before the DataLoader starts its workers, which then share the
    tables whether they are forked or spawned).

    Args:
        dataset: the data set's registry name (for warnings and reports).
        max_workers: worker slots; a worker beyond them shares the last row (counts stay
            right, but two workers may then race on it).
        max_examples / example_bytes: examples kept per row, and their length in UTF-8 bytes.
    """

    def __init__(self, dataset: str, max_workers: int = 64, max_examples: int = 5, example_bytes: int = 256):
        self.dataset, self.max_examples = dataset, int(max_examples)
        self.counts = torch.zeros(1 + int(max_workers), len(TALLY_KINDS), dtype=torch.int64).share_memory_()
        self.examples = torch.zeros(1 + int(max_workers), self.max_examples, int(example_bytes),
                                    dtype=torch.uint8).share_memory_()
        self._warned: set[str] = set()  # per process: each worker warns once per kind

    def _row(self) -> int:
        info = get_worker_info()
        return 0 if info is None else min(1 + info.id, self.counts.shape[0] - 1)

    def add(self, kind: str, path: str | Path, detail: str = "", *, warn: bool = True) -> None:
        """Count one problem in this process's row; the first of each kind per process is
        logged as a warning (a worker's log names the file too)."""
        column = TALLY_KINDS.index(kind) if kind in TALLY_KINDS else len(TALLY_KINDS) - 1
        row = self._row()
        n = int(self.counts[row].sum())
        self.counts[row, column] += 1
        if n < self.max_examples:
            text = f"{kind}\t{path}{': ' + detail if detail else ''}".encode()[: self.examples.shape[2]]
            self.examples[row, n, : len(text)] = torch.tensor(list(text), dtype=torch.uint8)
        if warn and kind not in self._warned:
            self._warned.add(kind)
            what = "converted to RGB" if kind == CONVERTED else f"skipped ({KINDS.get(kind, kind)})"
            log.warning("%s: %s %s%s; further files of this kind are counted silently",
                        self.dataset, path, what, f" [{detail}]" if detail else "")

    def add_error(self, err: BadSampleError, *, warn: bool = True) -> None:
        self.add(err.kind, err.path, err.detail, warn=warn)

    def tally(self) -> ProblemTally:
        """Every process slot's counts and examples merged into one :class:`ProblemTally`."""
        merged = ProblemTally(self.dataset, max_examples=self.max_examples)
        for column, total in enumerate(self.counts.sum(dim=0).tolist()):
            if total:
                merged.counts[TALLY_KINDS[column]] = int(total)
        for row in range(self.counts.shape[0]):
            for k in range(min(int(self.counts[row].sum()), self.max_examples)):
                raw = bytes(self.examples[row, k].tolist()).rstrip(b"\0").decode("utf-8", errors="replace")
                kind, _, text = raw.partition("\t")
                examples = merged.examples.setdefault(kind, [])
                if len(examples) < self.max_examples:
                    examples.append(text)
        return merged

    @property
    def skipped(self) -> int:
        return self.tally().skipped

    def report(self) -> dict[str, Any]:
        """Like :meth:`ProblemTally.report`, over every process slot."""
        return self.tally().report()


def merge_reports(reports: Iterable[Mapping[str, Any]], max_examples: int = 5) -> dict[str, Any]:
    """One report from several (one per rank): ``skipped``, ``converted_to_rgb`` and
    ``by_kind`` summed, examples concatenated (up to ``max_examples`` per kind); other
    fields are taken from the first report."""
    reports = list(reports)
    if not reports:
        return {}
    by_kind: Counter = Counter()
    examples: dict[str, list[str]] = {}
    for report in reports:
        by_kind.update({k: int(v) for k, v in (report.get("by_kind") or {}).items()})
        for kind, items in (report.get("examples") or {}).items():
            kept = examples.setdefault(kind, [])
            kept.extend(items[: max(max_examples - len(kept), 0)])
    merged = dict(reports[0])
    merged.update(skipped=sum(int(r.get("skipped", 0)) for r in reports),
                  converted_to_rgb=sum(int(r.get("converted_to_rgb", 0)) for r in reports),
                  by_kind=dict(sorted(by_kind.items())), examples=dict(sorted(examples.items())))
    return merged


def bad_file_counts(data: Any) -> dict[str, float]:
    """``data_skipped`` / ``data_converted_to_rgb`` from ``data.data_report()`` for the
    training logs ({} for a data set without a report). The built-in readers' reports are
    over every rank and loader worker — a collective under DDP, so every rank calls this."""
    report = data.data_report() if hasattr(data, "data_report") else {}
    return {f"data_{k}": float(report[k]) for k in ("skipped", "converted_to_rgb") if k in report}


__all__ = ["CONVERTED", "KINDS", "TALLY_KINDS", "BadSampleError", "ProblemTally", "SharedProblemTally",
           "bad_file_counts", "merge_reports"]
