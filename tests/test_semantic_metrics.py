"""mIoU of semantic synthesis and the object F1 of text-to-image: hand-computed cases, a
golden comparison with torchmetrics, and the cached ``shapes_segmenter``."""

from __future__ import annotations

import math

import pytest
import torch
from lgvq_plugins.tasks.segmenter import ShapesSegmenter, confusion, iou_per_class, mean_iou, objects_present
from lgvq_plugins.tasks.text_to_image import TextToImage, described_objects, object_f1
from torch import nn
from torchmetrics.functional.classification import multiclass_jaccard_index

from lgvq_plugins import api

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_iou_by_hand():
    target = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 2]])
    conf = confusion(pred, target, 4)
    assert conf.tolist() == [[3, 1, 0, 0], [0, 3, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    iou = iou_per_class(conf)
    # class 0: 3 / (4 + 3 - 3); class 1: 3 / (4 + 4 - 3); class 2: 0 / 1; class 3: absent (NaN)
    assert iou[:3].tolist() == pytest.approx([3 / 4, 3 / 5, 0.0]) and math.isnan(float(iou[3]))
    assert mean_iou(conf) == pytest.approx((3 / 4 + 3 / 5 + 0) / 3)


def test_miou_matches_torchmetrics_and_sums_over_batches():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 6, (10, 16, 16), generator=g)
    pred = torch.where(torch.rand(10, 16, 16, generator=g) < 0.6, target, torch.randint(0, 6, (10, 16, 16), generator=g))
    whole = multiclass_jaccard_index(pred, target, 6, average="macro")
    # summed per batch (as the task sums over batches and ranks), not averaged per image
    summed = confusion(pred[:3], target[:3], 6) + confusion(pred[3:], target[3:], 6)
    assert mean_iou(summed) == pytest.approx(float(whole), rel=1e-6)
    per_image = sum(mean_iou(confusion(p, t, 6)) for p, t in zip(pred, target)) / 10
    assert mean_iou(summed) != pytest.approx(per_image, rel=1e-6)


def test_object_f1_by_hand():
    assert object_f1(2, 3, 4) == pytest.approx(4 / 7)
    assert object_f1(0, 0, 0) == 1.0 and object_f1(0, 2, 0) == 0.0


def test_objects_present_by_hand():
    shape_map = torch.zeros(1, 4, 4, dtype=torch.long)
    colour_map = torch.zeros(1, 4, 4, dtype=torch.long)
    shape_map[0, :2, :2], colour_map[0, :2, :2] = 1, 3  # 4 pixels: shape 0, colour 2
    shape_map[0, 3, :3], colour_map[0, 3, :3] = 2, 1  # 3 pixels: shape 1, colour 0
    colour_map[0, 2, 3] = 2  # a coloured pixel on background counts for no object
    present = objects_present(shape_map, colour_map, num_shapes=2, num_colours=3, min_pixels=4)
    assert present.shape == (1, 2, 3) and present[0].nonzero().tolist() == [[0, 2]]
    present = objects_present(shape_map, colour_map, num_shapes=2, num_colours=3, min_pixels=3)
    assert present[0].nonzero().tolist() == [[0, 2], [1, 0]]


class MapReader(nn.Module):
    """A stand-in segmenter: returns queued (shape map, colour map) pairs, one per call."""

    def __init__(self, outputs: list[tuple[torch.Tensor, torch.Tensor]]):
        super().__init__()
        self.outputs = list(outputs)

    def read(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.outputs.pop(0)


def paint(objects: list[list[tuple[int, int]]], size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps with one 3×3 block per (shape, colour) object, images side by side in a batch."""
    shape_map = torch.zeros(len(objects), size, size, dtype=torch.long)
    colour_map = torch.zeros_like(shape_map)
    for b, objs in enumerate(objects):
        for k, (s, c) in enumerate(objs):
            shape_map[b, 4 * k: 4 * k + 3, :3], colour_map[b, 4 * k: 4 * k + 3, :3] = s + 1, c + 1
    return shape_map, colour_map


def test_text_to_image_object_counts_by_hand():
    data = api.create_dataset("shapes", split="test", size=32, num_samples=2)
    truth = [described_objects(data, i).nonzero().tolist() for i in range(2)]
    t0, t1 = len(truth[0]), len(truth[1])
    extra = next((s, c) for s in range(5) for c in range(8) if [s, c] not in truth[1])
    fake = paint([[], [tuple(o) for o in truth[1]] + [extra]])  # nothing; the objects and one more
    real = paint([[tuple(o) for o in truth[0]], [tuple(o) for o in truth[1]]])
    task = TextToImage()
    task._segmenter = MapReader([fake, real])  # generated first, then real
    sums = dict.fromkeys(task.extra_sums, 0.0)
    task.extra_metrics(data, [0, 1], torch.zeros(2, 3, 32, 32), None, sums)
    assert sums["true"] == t0 + t1 and sums["tp"] == t1 and sums["pred"] == t1 + 1
    assert sums["match"] == 0 and sums["match_real"] == 2 and sums["tp_real"] == sums["pred_real"] == t0 + t1
    metrics: dict = {}
    task.finish_metrics(data, sums, 2, metrics, {}, None)
    assert metrics["caption_object_f1"] == pytest.approx(2 * t1 / (t1 + 1 + t0 + t1))
    assert metrics["caption_object_f1_real"] == 1.0 and metrics["caption_match_real"] == 1.0


def test_segmenter_is_trained_once_deterministically_and_cached(tmp_path, monkeypatch):
    kw = dict(num_train=16, steps=4, batch_size=4, width=8, cache_dir=str(tmp_path))
    first = ShapesSegmenter(**kw)
    assert first.path.is_file() and first.path.with_suffix(".json").is_file()
    assert 0.0 <= first.info["heldout_miou"] <= 1.0 and len(first.info["heldout_iou_per_class"]) == 6
    assert 0.0 <= first.info["heldout_colour_miou"] <= 1.0
    retrained = ShapesSegmenter(**{**kw, "cache_dir": str(tmp_path / "other")})
    for a, b in zip(first.state_dict().values(), retrained.state_dict().values()):
        assert torch.equal(a, b)  # same settings, same weights (seeded)
    monkeypatch.setattr(ShapesSegmenter, "_fit", lambda self: pytest.fail("retrained a cached segmenter"))
    again = ShapesSegmenter(**kw)
    assert again.info == first.info
    x = torch.rand(2, 3, 24, 24) * 2 - 1  # another size: resized in, logits resized back
    assert first(x).shape == (2, 6, 24, 24) and first.segment(x).shape == (2, 24, 24)
    shapes, colours = first.read(x)
    assert shapes.shape == colours.shape == (2, 24, 24) and int(colours.max()) < 9


@pytest.mark.slow
def test_segmenter_learns_the_shapes(tmp_path):
    seg = ShapesSegmenter(num_train=500, steps=300, cache_dir=str(tmp_path))
    # predicting background everywhere scores at most 1/6 for shapes (one class of six right)
    # and 1/9 for colours; 300 steps on 500 scenes learn the colours first (the defaults,
    # 600 steps on 4000 scenes, reach 0.92 and 0.98: docs/downstream.md)
    assert seg.info["heldout_miou"] > 0.22 and min(seg.info["heldout_iou_per_class"]) > 0.02, seg.info
    assert seg.info["heldout_colour_miou"] > 0.5, seg.info
