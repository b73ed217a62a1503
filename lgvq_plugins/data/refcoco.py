"""``refcoco``: referring expressions with their objects' boxes (RefCOCO, RefCOCO+, RefCOCOg)
for the visual-grounding task.

Get ``refcoco.zip`` (``refs(unc).p`` + ``instances.json``) from the REFER API
(https://github.com/lichengunc/refer, data links in its README) and the COCO 2014 train
images (https://cocodataset.org/#download). ``refs(*).p`` is a Python pickle of plain lists
and dicts; it is read with :func:`~lgvq_plugins.data.safe_pickle.load_plain`, which refuses
any file that names a class or function (a malicious pickle can run code when loaded).

Samples: one per referred object: ``caption`` (= ``refexp``) one of its expressions
(training: per epoch; evaluation: the first), ``box`` float32 ``(x0, y0, x1, y1)`` in output
pixels (moved with the resize, crop and flip; ``x1``/``y1`` exclusive), ``ref_id``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lgvq_plugins.data.bad_samples import BadSampleError
from lgvq_plugins.data.captioned import CaptionedImages, Record, clean_captions
from lgvq_plugins.data.safe_pickle import load_plain
from lgvq_plugins.data.transforms import Geometry

LAYOUT = """\
  root/
    refcoco/refs(unc).p          (dataset='refcoco', split_by='unc'; refcoco+/refs(unc).p, refcocog/refs(umd).p ...)
    refcoco/instances.json       {"images": [{"id", "file_name"}], "annotations": [{"id", "bbox": [x, y, w, h]}]}
    train2014/COCO_train2014_000000581857.jpg ...
  splits: train, val, testA, testB (test = testA + testB); refcocog/umd: train, val, test"""


class RefCOCO(CaptionedImages):
    """RefCOCO-family referring expressions.

    Args:
        dataset: ``"refcoco"``, ``"refcoco+"`` or ``"refcocog"`` (the folder under root).
        split_by: ``"unc"``, ``"google"`` or ``"umd"`` (which ``refs(<split_by>).p``).
        Others as :class:`~lgvq_plugins.data.captioned.CaptionedImages`.
    """

    NAME = "refcoco"
    LAYOUT = LAYOUT
    REDUCED_DECODE = False  # boxes are in the original image's pixels

    def __init__(self, root: str, split: str = "train", size: int = 256, *, dataset: str = "refcoco",
                 split_by: str = "unc", **kwargs: Any):
        self.dataset, self.split_by = str(dataset), str(split_by)
        super().__init__(root, split, size, **kwargs)

    def read_records(self, root: Path, split: str) -> Iterable[Record | BadSampleError]:
        folder = self.require(root, self.dataset)
        refs_file = self.require(folder, f"refs({self.split_by}).p")
        instances = json.loads(self.require(folder, "instances.json").read_text(encoding="utf-8"))
        images_dir = self.require(root, "train2014", "images/train2014")
        refs = load_plain(refs_file)
        if not isinstance(refs, list):
            raise self.layout_error(root, f"{refs_file.name} does not hold a list of refs")
        files = {int(im["id"]): im["file_name"] for im in instances.get("images", [])}
        boxes = {int(a["id"]): a["bbox"] for a in instances.get("annotations", [])}
        wanted = {"test": {"test", "testA", "testB"}}.get(split, {split})
        found = False
        for n, ref in enumerate(refs):
            if not isinstance(ref, dict) or ref.get("split") not in wanted:
                continue
            found = True
            where = f"{refs_file}[{n}] (ref_id {ref.get('ref_id')})"
            try:
                name = files[int(ref["image_id"])]
                x, y, w, h = (float(v) for v in boxes[int(ref["ann_id"])])
            except (KeyError, TypeError, ValueError) as exc:
                yield BadSampleError(self.NAME, where, "bad_caption_record",
                                     f"image or annotation not in instances.json ({exc})")
                continue
            sentences = [s.get("sent", "") if isinstance(s, dict) else s for s in ref.get("sentences", [])]
            captions = clean_captions(sentences)
            if not captions:
                yield BadSampleError(self.NAME, where, "empty_caption" if sentences else "no_caption")
                continue
            yield Record(images_dir / name, captions, {"ref_id": int(ref.get("ref_id", n)),
                                                       "_box": (x, y, x + w, y + h)})
        if not found:
            splits = sorted({str(r.get("split")) for r in refs if isinstance(r, dict)})
            raise ValueError(f"refcoco: no refs of split {split!r} in {refs_file} (it has {splits})")

    def make_sample(self, index: int, image) -> dict[str, Any]:
        sample = super().make_sample(index, image)
        sample.pop("_box", None)
        sample["refexp"] = sample["caption"]
        return sample

    def geometric_extras(self, index: int, geometry: Geometry) -> dict[str, Any]:
        return {"box": geometry.box(self.records[index].extras["_box"])}


__all__ = ["LAYOUT", "RefCOCO"]
