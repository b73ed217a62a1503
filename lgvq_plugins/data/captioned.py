"""The shared body of the real-data readers: a list of (image file, captions, extras)
records read from a data set's own layout, checked, split, decoded and transformed.

A reader subclasses :class:`CaptionedImages` and implements :meth:`read_records` (and sets
``NAME`` and ``LAYOUT``). Everything else is here: the root check (a wrong root shows the
expected layout), bad-file handling (:mod:`lgvq_plugins.data.bad_samples`), the paper's
transforms (:mod:`lgvq_plugins.data.transforms`) and the sample dict::

    {"image": float32 (3, size, size) in [-1, 1], "caption": str, "index": int, **extras}
"""

from __future__ import annotations

import logging
import os
import zlib
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from lgvq_plugins.data.bad_samples import CONVERTED, KINDS, BadSampleError, ProblemTally
from lgvq_plugins.data.images import load_rgb, read_header
from lgvq_plugins.data.transforms import Geometry, PaperTransform, choose_caption
from lgvq_plugins.training import distributed as D

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
_KIND_CODES = tuple(KINDS)
DEFAULT_SPLIT_FRACTIONS = (0.9, 0.05, 0.05)


@dataclass
class Record:
    """One image and its captions. ``extras`` go into the sample as they are (they must
    collate: numbers, strings, tensors of one shape)."""

    image: Path
    captions: list[str]
    extras: dict[str, Any] = field(default_factory=dict)
    mode: str | None = None  # PIL mode from the header check, when done


def hash_split(key: str, fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS) -> str:
    """The split of ``key`` (an image's path relative to the root) from a stable hash:
    the same on every machine and Python run, and all captions of an image go together."""
    bucket = (zlib.crc32(key.replace(os.sep, "/").encode("utf-8")) % 10000) / 10000.0
    edge = 0.0
    for name, share in zip(SPLITS, fractions):
        edge += share
        if bucket < edge:
            return name
    return SPLITS[-1]


def clean_captions(captions: Iterable[Any]) -> list[str]:
    """Strings stripped of surrounding white space; empty ones dropped."""
    return [c.strip() for c in captions if isinstance(c, str) and c.strip()]


def read_caption_lines(dataset: str, image: Path, caption_file: Path) -> list[str] | BadSampleError:
    """The captions of ``image``, one per line of ``caption_file`` (CUB's and MM-CelebA-HQ's
    per-image text files), or the bad-sample error naming a missing or empty file."""
    if not caption_file.is_file():
        return BadSampleError(dataset, caption_file, "no_caption", f"for {image}")
    captions = clean_captions(caption_file.read_text(encoding="utf-8", errors="replace").splitlines())
    return captions or BadSampleError(dataset, caption_file, "empty_caption", f"for {image}")


class CaptionedImages(Dataset):
    """Base class of the image–caption readers (see the module docstring).

    Args:
        root: the data set's folder, laid out as ``LAYOUT`` shows.
        split: ``"train"``, ``"val"`` or ``"test"`` (readers may accept others).
        size: output side in pixels (the run's resolution).
        skip_bad_samples: skip bad files (counted, warned about, reported by
            :meth:`data_report`) instead of raising :class:`BadSampleError`.
        min_image_side: images smaller than this on either side are bad (``tiny_image``).
        check_images: read every image's header when built (finds missing, corrupt and tiny
            files and the ones to convert before training starts; a thread pool reads them).
            ``False`` only checks that files exist and leaves the rest to loading.
        flip: random horizontal flips in training (never when the caption names a side).
        seed: caption choice in training (with the epoch).
        num_samples: keep only the first ``num_samples`` records of the split (``None``: all).
    """

    NAME = "captioned"
    LAYOUT = ""
    #: decode large JPEGs at a reduced scale (False for readers with pixel coordinates)
    REDUCED_DECODE = True

    def __init__(self, root: str | os.PathLike, split: str = "train", size: int = 256, *,
                 skip_bad_samples: bool = False, min_image_side: int = 32, check_images: bool = True,
                 flip: bool = True, seed: int = 0, num_samples: int | None = None):
        self.root = self.check_root(root)
        self.split, self.size, self.seed = str(split), int(size), int(seed)
        self.skip_bad_samples, self.min_image_side = bool(skip_bad_samples), int(min_image_side)
        self.train = self.split == "train"
        self.transform = PaperTransform(self.size, train=self.train, flip=flip)
        self.problems = ProblemTally(self.NAME)
        self.epoch = 0
        records: list[Record] = []
        for item in self.read_records(self.root, self.split):
            if isinstance(item, BadSampleError):
                self._bad(item)
            elif not item.captions:
                self._bad(BadSampleError(self.NAME, item.image, "no_caption"))
            else:
                records.append(item)
        if num_samples is not None:
            records = records[:int(num_samples)]
        self.records = self._check_files(records, check_images)
        if not self.records:
            raise ValueError(f"{self.NAME}: no usable samples in split {self.split!r} under {self.root}"
                             f"{self._skipped_note()}.\nExpected layout:\n{self.LAYOUT}")
        # Bad files found while loading, one byte per record (0: not known bad, else 1 + the
        # index of its kind in KINDS), in shared memory: DataLoader workers (forked or
        # spawned by torch.multiprocessing) mark what they find, so the others skip it without
        # decoding it again and the main process can count it for metrics.json.
        self._load_bad = torch.zeros(len(self.records), dtype=torch.uint8).share_memory_()

    # -- for readers ----------------------------------------------------------------------
    def read_records(self, root: Path, split: str) -> Iterable[Record | BadSampleError]:
        """Yield the split's records (image path absolute) or the errors met reading them."""
        raise NotImplementedError

    @classmethod
    def layout_error(cls, root: Path, missing: str) -> FileNotFoundError:
        return FileNotFoundError(f"{cls.NAME}: {missing} under root {root}. Expected layout:\n{cls.LAYOUT}\n"
                                 f"Set `{cls.NAME}.root` to the folder that holds it (see docs/data.md).")

    @classmethod
    def check_root(cls, root: str | os.PathLike) -> Path:
        if root is None or str(root) == "":
            raise cls.layout_error(Path("<unset>"), "no root given")
        path = Path(root).expanduser()
        if not path.is_dir():
            raise cls.layout_error(path, "the root folder does not exist")
        return path

    @classmethod
    def require(cls, root: Path, *candidates: str) -> Path:
        """The first of ``candidates`` (relative paths) that exists, else a layout error."""
        for c in candidates:
            if (root / c).exists():
                return root / c
        raise cls.layout_error(root, " or ".join(repr(c) for c in candidates) + " not found")

    # -- bad files ------------------------------------------------------------------------
    def _bad(self, err: BadSampleError) -> None:
        if not self.skip_bad_samples:
            raise err
        self.problems.add_error(err)

    def _skipped_note(self) -> str:
        return f" ({self.problems.skipped} bad files skipped)" if self.problems.skipped else ""

    def _check_files(self, records: list[Record], check_images: bool) -> list[Record]:
        def check(rec: Record) -> Record | BadSampleError:
            try:
                if check_images:
                    rec.mode = read_header(rec.image, self.NAME, self.min_image_side).mode
                elif not rec.image.is_file():
                    raise BadSampleError(self.NAME, rec.image, "missing_image")
            except BadSampleError as err:
                return err
            return rec

        with ThreadPoolExecutor(max_workers=min(16, (os.cpu_count() or 1) * 4)) as pool:
            checked = list(pool.map(check, records, chunksize=64))
        kept = []
        for item in checked:  # in order, so the first bad file is the one reported
            if isinstance(item, BadSampleError):
                self._bad(item)
                continue
            if item.mode is not None and item.mode != "RGB":
                self.problems.add(CONVERTED, item.image, f"mode {item.mode}")
            kept.append(item)
        return kept

    # -- samples --------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        """Which caption training samples use this epoch."""
        self.epoch = int(epoch)

    def captions(self, index: int) -> list[str]:
        """Every caption of sample ``index``."""
        return list(self.records[index].captions)

    def all_captions(self) -> list[str]:
        """Every caption of the split, each once (for ``lgvq cache-text``)."""
        return list(dict.fromkeys(c for r in self.records for c in r.captions))

    def load_image(self, index: int):
        rec = self.records[index]
        # Large JPEGs decode at a reduced scale that still covers the output size, unless
        # the reader maps pixel coordinates of the original (boxes).
        return load_rgb(rec.image, self.NAME, rec.mode, self.size if self.REDUCED_DECODE else None)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if index < 0:
            index += len(self.records)
        if not 0 <= index < len(self.records):
            raise IndexError(f"{self.NAME}[{self.split}]: index {index} out of range 0..{len(self.records) - 1}")
        for offset in range(len(self.records)):
            # A bad file found only now (truncated, corrupt payload): skip to the next good
            # record, deterministically, so every worker and rank makes the same choice.
            j = (index + offset) % len(self.records)
            if self._load_bad[j]:
                continue
            try:
                return self.make_sample(j, self.load_image(j))
            except BadSampleError as err:
                if not self.skip_bad_samples:
                    raise
                self._load_bad[j] = 1 + (_KIND_CODES.index(err.kind) if err.kind in _KIND_CODES else 0)
                log.warning("%s", err)  # from a worker too: the log names every file found
        raise ValueError(f"{self.NAME}[{self.split}]: every image failed to load{self._skipped_note()}")

    def make_sample(self, index: int, image) -> dict[str, Any]:
        rec = self.records[index]
        caption = choose_caption(rec.captions, self.train, self.seed, index, self.epoch)
        pixels, geometry = self.transform.apply(image, caption)
        sample = {"image": pixels, "caption": caption, "index": index, **rec.extras}
        sample.update(self.geometric_extras(index, geometry))
        return sample

    def geometric_extras(self, index: int, geometry: Geometry) -> dict[str, Any]:
        """Sample fields that move with the image (boxes, masks): none here."""
        return {}

    def data_report(self) -> dict[str, Any]:
        """JSON-ready counts for ``metrics.json``: samples kept, files skipped by kind (found
        while building, or while loading in this process or its DataLoader workers — or, under
        DDP, on any rank: then a collective, call it on every rank), images converted to RGB.
        Counted once per file."""
        tally = ProblemTally(self.NAME, counts=self.problems.counts.copy(),
                             examples={k: list(v) for k, v in self.problems.examples.items()})
        load_bad = self._load_bad
        if D.is_distributed():  # every rank builds the same records; each finds its own bad files
            load_bad = D.all_reduce_max(load_bad.to(D.default_device(), torch.int32)).cpu()
        for j in torch.nonzero(load_bad).flatten().tolist():
            kind = _KIND_CODES[int(load_bad[j]) - 1]
            tally.add(kind, self.records[j].image, "found while loading", warn=False)
        return {"dataset": self.NAME, "split": self.split, "samples": len(self.records), **tally.report()}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, size={self.size}, "
                f"samples={len(self.records)}{self._skipped_note()})")


__all__ = ["DEFAULT_SPLIT_FRACTIONS", "SPLITS", "CaptionedImages", "Record", "clean_captions", "hash_split"]
