"""``vqa`` and ``grounding``: IoU and accuracy on constructed cases; both tasks
end to end on a tiny ``shapes`` split; the reader learns from its inputs."""

from __future__ import annotations

import math

import pytest
import torch
from lgvq_plugins.tasks.grounding import _to_box, accuracy_at, pair_iou
from lgvq_plugins.tasks.vqa import accuracy

import gin
from lgvq_plugins import api
from lgvq_plugins.evaluation.task import run_tasks
from lgvq_plugins.second_stage.heads import CodeReader, train_reader
from lgvq_plugins.second_stage.train import TrainSettings


def test_pair_iou_on_constructed_boxes():
    pred = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30]]).float()
    true = torch.tensor([[0, 0, 10, 10], [5, 0, 15, 10], [0, 0, 10, 5], [0, 0, 10, 10]]).float()
    iou = pair_iou(pred, true)
    # identical; half-overlapping (50 / 150); nested half (50 / 100); disjoint
    assert iou.tolist() == pytest.approx([1.0, 1 / 3, 0.5, 0.0])
    assert accuracy_at(iou, 0.5) == 0.5  # 0.5 itself counts
    assert accuracy_at(iou, 0.51) == 0.25
    assert math.isnan(accuracy_at(torch.zeros(0)))


def test_box_head_outputs_are_valid_boxes():
    box = _to_box(torch.randn(100, 4) * 5)
    assert (box[:, 2] >= box[:, 0]).all() and (box[:, 3] >= box[:, 1]).all()
    assert box.min() >= 0 and box.max() <= 1


def test_accuracy_on_constructed_answers():
    assert accuracy(["yes", "two", "red"], ["yes", "three", "red"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="equally many"):
        accuracy(["yes"], ["yes", "no"])


def test_the_reader_answers_from_the_words_and_the_codes():
    """Answer = (code vector sign) XOR (word 5 present): needs both inputs."""
    torch.manual_seed(0)
    n = 256
    bit_img = torch.randint(0, 2, (n,))
    bit_txt = torch.randint(0, 2, (n,))
    vectors = (bit_img.float() * 2 - 1)[:, None, None].expand(n, 4, 3).clone()
    words = torch.stack([torch.tensor([4, 5 if b else 6, 0]) for b in bit_txt.tolist()])
    target = bit_img ^ bit_txt
    reader = CodeReader(3, 4, 8, 3, 2, width=32, depth=2, heads=2)
    train_reader(reader, (vectors, words), target, torch.nn.functional.cross_entropy,
                 TrainSettings(steps=150, batch_size=32, lr=3e-3))
    with torch.no_grad():
        acc = (reader(vectors, words).argmax(-1) == target).float().mean().item()
    assert acc > 0.95


GIN = ["second_stage_training.steps = 6", "second_stage_training.batch_size = 4",
       "CodeReader.width = 32", "CodeReader.depth = 1", "CodeReader.heads = 2"]


@pytest.mark.parametrize("name,metric", [("vqa", "accuracy"), ("grounding", "acc_0.5")])
def test_task_end_to_end(tmp_path, name, metric):
    api.list_tasks()  # load the plugins, so gin knows the registered names
    gin.parse_config(GIN + [f"lgvq.task.{name}.{k}" for k in (
        "train_images = 24", f"cache_dir = '{tmp_path / 'cache'}'", "batch_size = 4", "max_images = 6")])
    torch.manual_seed(0)
    tok = api.create_backbone("vqgan", resolution=32, ch=8, ch_mult=(1, 2, 2), num_res_blocks=1,
                              attn_resolutions=(), z_channels=8, embed_dim=8, quantizer_config={"num_codes": 32},
                              disc_ndf=8, disc_n_layers=1).eval()
    data = api.create_dataset("shapes", split="test", size=32, num_samples=8)
    r = run_tasks(tok, data, [name], tmp_path / "eval")[name]
    assert 0.0 <= r.metrics[metric] <= 1.0
    assert r.protocol["images"] == 6 and r.protocol["reader"]["train_images"] == 24
    assert len(r.tables["examples"]) == 6
    if name == "vqa":  # WUPS where WordNet is installed (tests/test_wups.py), else unavailable with the reason
        for k in ("wups_0.9", "wups_0.0"):
            assert (0.0 <= r.metrics[k] <= 1.0) if r.metrics[k] is not None else "WordNet" in r.unavailable[k]
        if r.metrics["wups_0.0"] is not None:
            assert r.metrics["accuracy"] <= r.metrics["wups_0.9"] <= r.metrics["wups_0.0"]
    else:
        assert 0.0 <= r.metrics["mean_iou"] <= 1.0
