"""``textcaps``: TextCaps captions (images with text in them, from TextVQA / Open Images).

Get ``TextCaps_0.1_train.json`` and ``TextCaps_0.1_val.json`` from https://textvqa.org/textcaps/dataset/
and the images (``train_val_images.zip``, which unpacks to ``train_images/``) from
https://textvqa.org/dataset/. Both splits' images live in ``train_images/``. The test JSON
has no captions, so ``test`` is the validation set.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from lgvq_plugins.data.bad_samples import BadSampleError
from lgvq_plugins.data.captioned import CaptionedImages, Record, clean_captions
from lgvq_plugins.data.coco import group_by_image

LAYOUT = """\
  root/
    TextCaps_0.1_train.json, TextCaps_0.1_val.json    {"data": [{"image_id", "image_path", "caption_str", ...}]}
    train_images/0054c91397f2fe05.jpg ...             (image_path "train/<id>.jpg" is looked up here)
  splits: train → TextCaps_0.1_train.json, val and test → TextCaps_0.1_val.json"""


class TextCaps(CaptionedImages):
    """TextCaps images and their (about five) captions. Arguments as
    :class:`~lgvq_plugins.data.captioned.CaptionedImages`."""

    NAME = "textcaps"
    LAYOUT = LAYOUT

    def _image_path(self, root: Path, entry: dict) -> Path:
        rel = str(entry.get("image_path") or f"train/{entry['image_id']}.jpg")
        name = Path(rel).name
        for candidate in (root / rel, root / "train_images" / name, root / "images" / name):
            if candidate.is_file():
                return candidate
        return root / "train_images" / name  # missing: reported as such, with this path

    def read_records(self, root: Path, split: str) -> Iterable[Record | BadSampleError]:
        part = {"train": "train", "val": "val", "test": "val"}.get(split)
        if part is None:
            raise ValueError(f"textcaps: split={split!r} must be 'train', 'val' or 'test'")
        ann_file = self.require(root, f"TextCaps_0.1_{part}.json", f"annotations/TextCaps_0.1_{part}.json")
        if not (root / "train_images").is_dir() and not (root / "train").is_dir():
            raise self.layout_error(root, "no train_images/ folder")
        data = json.loads(ann_file.read_text(encoding="utf-8")).get("data")
        if not isinstance(data, list):
            raise self.layout_error(root, f'{ann_file.name} has no "data" list')
        entries = {}
        pairs = []
        for entry in data:
            key = str(entry.get("image_id"))
            entries.setdefault(key, entry)
            pairs.append((key, entry.get("caption_str", "")))
        for key, captions in group_by_image(pairs).items():
            path = self._image_path(root, entries[key])
            caps = clean_captions(captions)
            if not caps:
                yield BadSampleError(self.NAME, path, "empty_caption")
                continue
            yield Record(path, caps, {"image_id": key})


__all__ = ["LAYOUT", "TextCaps"]
