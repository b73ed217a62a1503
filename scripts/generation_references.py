"""Reference points for the generation tasks' `shapes` metrics, to read their numbers against.

* ``text_to_image``: what the object reader (``shapes_segmenter``) scores on *real* test
  images against their own captions (the ceiling the task reports as ``caption_*_real``) and
  against another image's caption (the level of an image that ignores its caption);
* ``semantic_synthesis``: the mIoU of predicting background everywhere and of another
  image's semantic map (the level of an image that ignores its map).

    python scripts/generation_references.py --images 64
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from lgvq_plugins import api
from lgvq_plugins.tasks.segmenter import ShapesSegmenter, confusion, mean_iou, objects_present
from lgvq_plugins.tasks.text_to_image import described_objects, object_f1


def scores(read: torch.Tensor, truth: torch.Tensor) -> tuple[float, float]:
    """(object F1, exact-match rate) of read objects against described ones, both (N, objects)."""
    f1 = object_f1(float((read & truth).sum()), float(read.sum()), float(truth.sum()))
    return f1, float((read == truth).all(1).double().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=64, help="first test images (the task's max_images)")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--min-object-pixels", type=int, default=4)
    ap.add_argument("--shifts", type=int, default=7, help="mismatched pairings: caption of image i + k, k = 1..shifts")
    args = ap.parse_args()
    data = api.create_dataset("shapes", split="test", size=args.size, num_samples=args.images)
    images = torch.stack([data[i]["image"] for i in range(len(data))])
    truth = torch.stack([described_objects(data, i) for i in range(len(data))]).flatten(1)
    shapes, colours = ShapesSegmenter().read(images)
    read = objects_present(shapes, colours, len(data.SHAPES), len(data.COLOURS), args.min_object_pixels).flatten(1)
    maps = torch.stack([torch.as_tensor(data[i]["semantic"]) for i in range(len(data))]).long()
    classes = 1 + len(data.SHAPES)
    other_maps = [mean_iou(confusion(maps.roll(k, 0), maps, classes)) for k in range(1, args.shifts + 1)]
    own = scores(read, truth)
    other = [scores(read, truth.roll(k, 0)) for k in range(1, args.shifts + 1)]
    print(json.dumps({"images": len(data), "own_caption": {"object_f1": own[0], "match": own[1]},
                      "another_caption": {"object_f1_mean": statistics.mean(f for f, _ in other),
                                          "object_f1_range": [min(f for f, _ in other), max(f for f, _ in other)],
                                          "match_mean": statistics.mean(m for _, m in other)},
                      "semantic_miou": {"all_background": mean_iou(confusion(torch.zeros_like(maps), maps, classes)),
                                        "another_map_mean": statistics.mean(other_maps),
                                        "another_map_range": [min(other_maps), max(other_maps)]}}, indent=2))


if __name__ == "__main__":
    main()
