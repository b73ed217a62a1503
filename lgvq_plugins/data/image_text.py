"""``image_text``: your own captioned images, in one of three layouts.

    create_dataset("image_text", root="my_photos", split="train", size=256)

The caption source is found in this order: ``captions.jsonl``, ``captions.csv``, else a
``.txt`` beside each image (one caption per line). Splits come from a ``split`` field or
column when a record has one, else from a stable hash of the image's relative path
(90 / 5 / 5 %, :func:`~lgvq_plugins.data.captioned.hash_split`).
"""

from __future__ import annotations

import csv
import json
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lgvq_plugins.data.bad_samples import BadSampleError
from lgvq_plugins.data.captioned import (
    CaptionedImages,
    Record,
    clean_captions,
    hash_split,
)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

LAYOUT = """\
  root/
    captions.jsonl      one JSON object per line:
                          {"image": "imgs/0001.jpg", "captions": ["a red bird", "..."]}
                          or {"image": "...", "caption": "..."}; optional "split": "train"|"val"|"test"
  or captions.csv       columns image,caption[,split]; several rows per image allowed
  or imgs/0001.jpg + imgs/0001.txt
                        a .txt beside each image, one caption per line
  (image paths are relative to root; images: .jpg .jpeg .png .webp .bmp .gif .tif)"""


class ImageTextDataset(CaptionedImages):
    """Images with captions from ``captions.jsonl``, ``captions.csv`` or ``.txt`` files.

    Takes every argument of :class:`~lgvq_plugins.data.captioned.CaptionedImages`, plus
    ``split_fractions`` (train, val, test) for images without a ``split`` field.
    """

    NAME = "image_text"
    LAYOUT = LAYOUT

    def __init__(self, root: str, split: str = "train", size: int = 256, *,
                 split_fractions: tuple[float, float, float] = (0.9, 0.05, 0.05), **kwargs: Any):
        if abs(sum(split_fractions) - 1.0) > 1e-6 or any(f < 0 for f in split_fractions):
            raise ValueError(f"image_text: split_fractions={tuple(split_fractions)} must be >= 0 and sum to 1")
        self.split_fractions = tuple(float(f) for f in split_fractions)
        super().__init__(root, split, size, **kwargs)

    def read_records(self, root: Path, split: str) -> Iterable[Record | BadSampleError]:
        if (root / "captions.jsonl").is_file():
            entries = self._read_jsonl(root / "captions.jsonl")
        elif (root / "captions.csv").is_file():
            entries = self._read_csv(root / "captions.csv")
        else:
            entries = self._read_txt(root)
        # image → (captions, split, problem), merged in file order
        merged: OrderedDict[str, list[Any]] = OrderedDict()
        for item in entries:
            if isinstance(item, BadSampleError):
                yield item
                continue
            rel, captions, item_split, had_caption = item
            slot = merged.setdefault(rel, [[], item_split, False])
            slot[0].extend(captions)
            slot[1] = slot[1] or item_split
            slot[2] = slot[2] or had_caption
        for rel, (captions, item_split, had_caption) in merged.items():
            if (item_split or hash_split(rel, self.split_fractions)) != split:
                continue
            path = root / rel
            if not captions:
                yield BadSampleError(self.NAME, path, "empty_caption" if had_caption else "no_caption")
            else:
                yield Record(path, captions)

    # Each reader yields (relative image path, captions, split or None, a caption was given).
    def _read_jsonl(self, path: Path) -> Iterable[tuple | BadSampleError]:
        with path.open(encoding="utf-8") as fh:
            for line_no, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                where = f"{path}:{line_no}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    yield BadSampleError(self.NAME, where, "bad_caption_record", f"invalid JSON: {exc.msg}")
                    continue
                if not isinstance(obj, dict) or not isinstance(obj.get("image"), str):
                    yield BadSampleError(self.NAME, where, "bad_caption_record", 'no "image" path')
                    continue
                raw = obj.get("captions", obj.get("caption"))
                raw = [raw] if isinstance(raw, str) else (raw or [])
                yield obj["image"], clean_captions(raw), obj.get("split"), "captions" in obj or "caption" in obj

    def _read_csv(self, path: Path) -> Iterable[tuple | BadSampleError]:
        with path.open(encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or not {"image", "caption"} <= set(reader.fieldnames):
                raise self.layout_error(self.root, f"{path.name} lacks the columns 'image' and 'caption' "
                                                   f"(has {reader.fieldnames})")
            for row_no, row in enumerate(reader, 2):
                if not row.get("image"):
                    yield BadSampleError(self.NAME, f"{path}:{row_no}", "bad_caption_record", "empty image column")
                    continue
                yield row["image"], clean_captions([row.get("caption") or ""]), row.get("split") or None, True

    def _read_txt(self, root: Path) -> Iterable[tuple | BadSampleError]:
        images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not images:
            raise self.layout_error(root, "no captions.jsonl, no captions.csv and no images")
        for image in images:
            txt = image.with_suffix(".txt")
            rel = image.relative_to(root).as_posix()
            if not txt.is_file():
                yield rel, [], None, False
                continue
            try:
                lines = txt.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                yield BadSampleError(self.NAME, txt, "bad_caption_record", f"{type(exc).__name__}: {exc}")
                continue
            yield rel, clean_captions(lines), None, True


__all__ = ["IMAGE_SUFFIXES", "LAYOUT", "ImageTextDataset"]
