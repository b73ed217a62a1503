"""``cub200``: CUB-200-2011 birds with the ten captions per image of Reed et al. (2016).

Images: https://www.vision.caltech.edu/datasets/cub_200_2011/ (``CUB_200_2011.tgz``).
Captions: Reed et al.'s ``cvpr2016_cub`` (``text_c10/``), or the AttnGAN/DF-GAN
``birds.zip`` (``text/`` plus ``train|test/filenames.pickle``), which LG-VQ's reference
code reads. Splits: ``split_source="official"`` uses ``train_test_split.txt`` (5994 train /
5794 test images); ``"attngan"`` uses the class split of ``filenames.pickle`` (150 / 50
classes, read with the plain-data unpickler). CUB has no validation split: ``val`` is
``test``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lgvq_plugins.data.bad_samples import BadSampleError
from lgvq_plugins.data.captioned import (
    CaptionedImages,
    Record,
    read_caption_lines,
)
from lgvq_plugins.data.safe_pickle import load_plain

LAYOUT = """\
  root/
    CUB_200_2011/images.txt               "<id> 001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg"
    CUB_200_2011/train_test_split.txt     "<id> <1 train | 0 test>"   (split_source='official')
    CUB_200_2011/images/001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg ...
    text/001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.txt   (or text_c10/; 10 captions, one per line)
    train/filenames.pickle, test/filenames.pickle                     (split_source='attngan' only)"""


class CUB200(CaptionedImages):
    """CUB-200-2011 + Reed et al.'s captions. Arguments as
    :class:`~lgvq_plugins.data.captioned.CaptionedImages`, plus ``split_source``
    (``"official"`` or ``"attngan"``)."""

    NAME = "cub200"
    LAYOUT = LAYOUT

    def __init__(self, root: str, split: str = "train", size: int = 256, *, split_source: str = "official",
                 **kwargs: Any):
        if split_source not in ("official", "attngan"):
            raise ValueError(f"cub200: split_source={split_source!r} must be 'official' or 'attngan'")
        self.split_source = split_source
        super().__init__(root, split, size, **kwargs)

    def read_records(self, root: Path, split: str) -> Iterable[Record | BadSampleError]:
        if split not in ("train", "val", "test"):
            raise ValueError(f"cub200: split={split!r} must be 'train', 'val' (= 'test') or 'test'")
        want_train = split == "train"
        cub = self.require(root, "CUB_200_2011")
        text = self.require(root, "text", "text_c10")
        listing = self.require(cub, "images.txt")
        paths = dict(line.split(maxsplit=1) for line in listing.read_text().splitlines() if line.strip())
        if self.split_source == "official":
            flags = self.require(cub, "train_test_split.txt")
            chosen = [paths[i].strip() for i, flag in (line.split() for line in flags.read_text().splitlines()
                                                       if line.strip())
                      if (flag == "1") == want_train]
        else:
            names = load_plain(self.require(root, f"{'train' if want_train else 'test'}/filenames.pickle"))
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise self.layout_error(root, "filenames.pickle does not hold a list of file names")
            chosen = [f"{n}.jpg" for n in names]
        for rel in chosen:
            image = cub / "images" / rel
            caption_file = (text / rel).with_suffix(".txt")
            captions = read_caption_lines(self.NAME, image, caption_file)
            if isinstance(captions, BadSampleError):
                yield captions
                continue
            yield Record(image, captions, {"label": int(rel.split(".", 1)[0]) - 1})


__all__ = ["CUB200", "LAYOUT"]
