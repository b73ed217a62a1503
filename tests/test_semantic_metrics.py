"""mIoU of semantic synthesis and the object F1 of text-to-image: hand-computed cases, a
golden comparison with torchmetrics, and the cached ``shapes_segmenter``."""

from __future__ import annotations

import math

import pytest
import torch
from lgvq_plugins.tasks.segmenter import ShapesSegmenter, confusion, iou_per_class, mean_iou
from lgvq_plugins.tasks.text_to_image import TextToImage, object_f1
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


class QueuedReader(nn.Module):
    """A stand-in for the shapes probe: returns queued label logits, one batch per call."""

    def __init__(self, outputs: list[torch.Tensor]):
        super().__init__()
        self.outputs = list(outputs)
        self.net = nn.Module()
        self.net.head = nn.Identity()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.outputs.pop(0)


def test_text_to_image_object_counts_by_hand():
    from lgvq_plugins.tasks.features import shapes_labels

    data = api.create_dataset("shapes", split="test", size=32, num_samples=2)
    n_combo = len(data.SHAPES) * len(data.COLOURS) * len(data.SIZES)
    truth = torch.stack([shapes_labels(data, i)[:n_combo] for i in range(2)]).bool()
    fake = truth.clone()
    fake[0] = False  # the first generated image shows nothing
    extra = (~truth[1]).nonzero()[0, 0]
    fake[1, extra] = True  # the second shows its objects and one more
    logits = [(fake.float() * 2 - 1), (truth.float() * 2 - 1)]  # generated first, then real
    task = TextToImage()
    sums = dict.fromkeys(task.extra_sums, 0.0)
    task.extra_metrics(data, [0, 1], torch.zeros(2, 3, 32, 32), QueuedReader(logits), sums)
    t0, t1 = int(truth[0].sum()), int(truth[1].sum())
    assert sums["true"] == t0 + t1 and sums["tp"] == t1 and sums["pred"] == t1 + 1
    assert sums["match"] == 0 and sums["match_real"] == 2 and sums["tp_real"] == sums["pred_real"] == t0 + t1
    metrics: dict = {}
    task.finish_metrics(data, sums, 2, metrics, {}, QueuedReader([]))
    assert metrics["caption_object_f1"] == pytest.approx(2 * t1 / (t1 + 1 + t0 + t1))
    assert metrics["caption_object_f1_real"] == 1.0 and metrics["caption_match_real"] == 1.0


def test_segmenter_is_trained_once_deterministically_and_cached(tmp_path, monkeypatch):
    kw = dict(num_train=16, steps=4, batch_size=4, width=8, cache_dir=str(tmp_path))
    first = ShapesSegmenter(**kw)
    assert first.path.is_file() and first.path.with_suffix(".json").is_file()
    assert 0.0 <= first.info["heldout_miou"] <= 1.0 and len(first.info["heldout_iou_per_class"]) == 6
    retrained = ShapesSegmenter(**{**kw, "cache_dir": str(tmp_path / "other")})
    for a, b in zip(first.state_dict().values(), retrained.state_dict().values()):
        assert torch.equal(a, b)  # same settings, same weights (seeded)
    monkeypatch.setattr(ShapesSegmenter, "_fit", lambda self: pytest.fail("retrained a cached segmenter"))
    again = ShapesSegmenter(**kw)
    assert again.info == first.info
    x = torch.rand(2, 3, 24, 24) * 2 - 1  # another size: resized in, logits resized back
    assert first(x).shape == (2, 6, 24, 24) and first.segment(x).shape == (2, 24, 24)


@pytest.mark.slow
def test_segmenter_learns_the_shapes(tmp_path):
    seg = ShapesSegmenter(num_train=500, steps=150, cache_dir=str(tmp_path))
    # predicting background everywhere scores at most 1/6 (one class of six right)
    assert seg.info["heldout_miou"] > 0.3 and min(seg.info["heldout_iou_per_class"]) > 0.1, seg.info
