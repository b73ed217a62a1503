"""MS-COCO: ``coco_captions`` (2014 or 2017 caption JSON) and ``coco_qa`` (COCO-QA's
questions and answers on COCO 2014 images, for the VQA task).

Get them from https://cocodataset.org/#download (``train2014.zip``, ``val2014.zip``,
``annotations_trainval2014.zip``; or the 2017 files) and COCO-QA from
https://www.cs.toronto.edu/~mren/research/imageqa/data/cocoqa/ (``cocoqa-2015-05-17.zip``).
Image file names are read from the annotation files (``file_name``) or from the image
folders, never built from a fixed zero-padded pattern.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lgvq_plugins.data.bad_samples import BadSampleError
from lgvq_plugins.data.captioned import CaptionedImages, Record, clean_captions

CAPTIONS_LAYOUT = """\
  root/
    annotations/captions_train2014.json, annotations/captions_val2014.json   (year=2014)
    annotations/captions_train2017.json, annotations/captions_val2017.json   (year=2017)
    train2014/COCO_train2014_000000000009.jpg ...   val2014/...   (or train2017/000000000009.jpg ...)
  splits: train → train<year>, val and test → val<year>"""

QA_LAYOUT = """\
  root/
    cocoqa/train/img_ids.txt, questions.txt, answers.txt, types.txt   (COCO-QA, one line per question)
    cocoqa/test/...
    train2014/COCO_train2014_*.jpg, val2014/COCO_val2014_*.jpg        (COCO 2014 images)
  splits: train → cocoqa/train, val and test → cocoqa/test"""

QA_TYPES = ("object", "number", "color", "location")
_TRAILING_ID = re.compile(r"(\d+)\.(?:jpg|jpeg|png)$", re.IGNORECASE)


class COCOCaptions(CaptionedImages):
    """MS-COCO images with their five captions. ``year``: 2014 or 2017. Other arguments as
    :class:`~lgvq_plugins.data.captioned.CaptionedImages`."""

    NAME = "coco_captions"
    LAYOUT = CAPTIONS_LAYOUT

    def __init__(self, root: str, split: str = "train", size: int = 256, *, year: int = 2014, **kwargs: Any):
        if int(year) not in (2014, 2017):
            raise ValueError(f"coco_captions: year={year} must be 2014 or 2017")
        self.year = int(year)
        super().__init__(root, split, size, **kwargs)

    def read_records(self, root: Path, split: str) -> Iterable[Record | BadSampleError]:
        part = {"train": "train", "val": "val", "test": "val"}.get(split)
        if part is None:
            raise ValueError(f"coco_captions: split={split!r} must be 'train', 'val' or 'test'")
        ann_file = self.require(root, f"annotations/captions_{part}{self.year}.json")
        folder = self.require(root, f"{part}{self.year}")
        ann = json.loads(ann_file.read_text(encoding="utf-8"))
        captions: dict[int, list[str]] = {}
        for a in ann.get("annotations", []):
            captions.setdefault(int(a["image_id"]), []).append(a.get("caption", ""))
        for img in sorted(ann.get("images", []), key=lambda im: int(im["id"])):
            path = folder / img["file_name"]
            caps = clean_captions(captions.get(int(img["id"]), []))
            if not caps:
                kind = "empty_caption" if int(img["id"]) in captions else "no_caption"
                yield BadSampleError(self.NAME, path, kind)
                continue
            yield Record(path, caps, {"image_id": int(img["id"])})


def index_images(*folders: Path) -> dict[int, Path]:
    """COCO image id → file, from the trailing number of each file name in ``folders``."""
    found: dict[int, Path] = {}
    for folder in folders:
        if folder.is_dir():
            for p in folder.iterdir():
                m = _TRAILING_ID.search(p.name)
                if m:
                    found.setdefault(int(m.group(1)), p)
    return found


class COCOQA(CaptionedImages):
    """COCO-QA: one sample per question with ``question``, ``answer`` and ``qa_type``
    (``object``/``number``/``color``/``location``); ``caption`` is the question (COCO-QA
    has no captions of its own). Arguments as
    :class:`~lgvq_plugins.data.captioned.CaptionedImages`; flips are off by default
    (answers such as "left" and colour words stay true, but locations would not)."""

    NAME = "coco_qa"
    LAYOUT = QA_LAYOUT

    def __init__(self, root: str, split: str = "train", size: int = 256, **kwargs: Any):
        kwargs.setdefault("flip", False)
        super().__init__(root, split, size, **kwargs)

    def read_records(self, root: Path, split: str) -> Iterable[Record | BadSampleError]:
        part = {"train": "train", "val": "test", "test": "test"}.get(split)
        if part is None:
            raise ValueError(f"coco_qa: split={split!r} must be 'train', 'val' or 'test'")
        qa = self.require(root, f"cocoqa/{part}", f"coco_qa/{part}", part)
        columns = {}
        for name in ("img_ids", "questions", "answers", "types"):
            columns[name] = self.require(qa, f"{name}.txt").read_text(encoding="utf-8").splitlines()
        lengths = {k: len(v) for k, v in columns.items()}
        if len(set(lengths.values())) != 1:
            raise self.layout_error(qa, f"the four files differ in length {lengths}")
        images = index_images(root / "train2014", root / "val2014")
        if not images:
            raise self.layout_error(root, "no COCO 2014 images in train2014/ or val2014/")
        for line, (img_id, q, a, t) in enumerate(zip(*columns.values()), 1):
            where = f"{qa}/img_ids.txt:{line}"
            try:
                path = images.get(int(img_id))
                qa_type = QA_TYPES[int(t)]
            except (ValueError, IndexError):
                yield BadSampleError(self.NAME, where, "bad_caption_record", f"img_id {img_id!r}, type {t!r}")
                continue
            if path is None:
                yield BadSampleError(self.NAME, where, "missing_image", f"COCO image id {img_id}")
                continue
            if not q.strip() or not a.strip():
                yield BadSampleError(self.NAME, where, "empty_caption", "empty question or answer")
                continue
            yield Record(path, [q.strip()], {"question": q.strip(), "answer": a.strip(), "qa_type": qa_type})


def group_by_image(entries: Iterable[tuple[str, str]]) -> OrderedDict[str, list[str]]:
    """(image key, caption) pairs → image key → captions, in first-seen order."""
    grouped: OrderedDict[str, list[str]] = OrderedDict()
    for key, caption in entries:
        grouped.setdefault(key, []).append(caption)
    return grouped


__all__ = [
    "CAPTIONS_LAYOUT",
    "COCOQA",
    "QA_LAYOUT",
    "QA_TYPES",
    "COCOCaptions",
    "group_by_image",
    "index_images",
]
