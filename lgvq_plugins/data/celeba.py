"""``mm_celeba_hq``: CelebA-HQ faces with the ten captions per image of Multi-Modal-CelebA-HQ
(Xia et al., TediGAN) and, optionally, CelebAMask-HQ's semantic masks.

Get the images, captions and masks from https://github.com/IIGROUP/MM-CelebA-HQ-Dataset
(``CelebA-HQ-img/``, ``celeba-caption/``, ``CelebAMask-HQ-mask-anno/`` merged into one label
map per image, e.g. ``CelebAMask-HQ-mask/<id>.png`` with values 0..18). Splits:
``train|test/filenames.pickle`` when present (plain-data unpickler), else the dataset's
convention: ids 0–23999 train, 24000–29999 test. ``val`` is ``test``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from lgvq_plugins.data.bad_samples import BadSampleError
from lgvq_plugins.data.captioned import (
    CaptionedImages,
    Record,
    read_caption_lines,
)
from lgvq_plugins.data.safe_pickle import load_plain
from lgvq_plugins.data.transforms import Geometry

LAYOUT = """\
  root/
    CelebA-HQ-img/0.jpg ... 29999.jpg
    celeba-caption/0.txt ... 29999.txt        (10 captions, one per line)
    CelebAMask-HQ-mask/0.png ...              (masks=True only: one label map per image, 0..18)
    train/filenames.pickle, test/filenames.pickle   (optional; else ids < 24000 are train)"""

NUM_TRAIN = 24000
MASK_CLASSES = 19


class MMCelebAHQ(CaptionedImages):
    """CelebA-HQ + MM-CelebA-HQ captions (+ masks). ``masks=True`` adds ``"mask"`` (int64
    (size, size)), resized, cropped and flipped with the image. Other arguments as
    :class:`~lgvq_plugins.data.captioned.CaptionedImages`."""

    NAME = "mm_celeba_hq"
    LAYOUT = LAYOUT

    def __init__(self, root: str, split: str = "train", size: int = 256, *, masks: bool = False, **kwargs: Any):
        self.masks = bool(masks)
        super().__init__(root, split, size, **kwargs)

    def read_records(self, root: Path, split: str) -> Iterable[Record | BadSampleError]:
        if split not in ("train", "val", "test"):
            raise ValueError(f"mm_celeba_hq: split={split!r} must be 'train', 'val' (= 'test') or 'test'")
        images = self.require(root, "CelebA-HQ-img")
        captions = self.require(root, "celeba-caption")
        mask_dir = self.require(root, "CelebAMask-HQ-mask", "mask") if self.masks else None
        part = "train" if split == "train" else "test"
        listing = root / part / "filenames.pickle"
        if listing.is_file():
            ids = [str(n) for n in load_plain(listing)]
        else:
            all_ids = sorted(int(p.stem) for p in captions.glob("*.txt") if p.stem.isdigit())
            ids = [str(i) for i in all_ids if (i < NUM_TRAIN) == (part == "train")]
        for stem in ids:
            image = images / f"{stem}.jpg"
            caption_file = captions / f"{stem}.txt"
            caps = read_caption_lines(self.NAME, image, caption_file)
            if isinstance(caps, BadSampleError):
                yield caps
                continue
            extras = {}
            if mask_dir is not None:
                mask = mask_dir / f"{stem}.png"
                if not mask.is_file():
                    yield BadSampleError(self.NAME, mask, "missing_image", "mask")
                    continue
                extras["mask_path"] = str(mask)
            yield Record(image, caps, extras)

    def make_sample(self, index: int, image) -> dict[str, Any]:
        sample = super().make_sample(index, image)
        sample.pop("mask_path", None)
        return sample

    def geometric_extras(self, index: int, geometry: Geometry) -> dict[str, Any]:
        if not self.masks:
            return {}
        path = Path(self.records[index].extras["mask_path"])
        try:
            with Image.open(path) as im:
                labels = torch.from_numpy(np.array(im.convert("L"), dtype=np.int64))
        except OSError as exc:
            raise BadSampleError(self.NAME, path, "corrupt_image", f"mask: {exc}") from None
        return {"mask": geometry.mask(labels)}


__all__ = ["LAYOUT", "MASK_CLASSES", "MMCelebAHQ"]
