"""The understanding tasks on the real data sets' file formats (fixture trees in the
readers' own layouts): ``vqa`` on COCO-QA, ``grounding`` on RefCOCO, ``captioning`` on COCO
captions. Nothing here is downloaded; the trees are written by ``data_fixtures``."""

from __future__ import annotations

import pytest
import torch
from data_fixtures import coco_qa_tree, coco_tree, refcoco_tree

import gin
from lgvq_plugins import api
from lgvq_plugins.evaluation.task import run_tasks

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GIN = ["second_stage_training.steps = 4", "second_stage_training.batch_size = 1",  # RefCOCO fixture: 1 train ref
       "CodeReader.width = 32", "CodeReader.depth = 1", "CodeReader.heads = 2",
       "CodeGPT.width = 32", "CodeGPT.depth = 1", "CodeGPT.heads = 2"]

CASES = {  # task: (reader, tree builder, evaluated split, metric)
    "vqa": ("coco_qa", coco_qa_tree, "test", "accuracy"),
    "grounding": ("refcoco", refcoco_tree, "val", "acc_0.5"),
    "captioning": ("coco_captions", coco_tree, "val", "bleu_4"),
}


def tiny_tokenizer():
    torch.manual_seed(0)
    return api.create_backbone("vqgan", resolution=32, ch=8, ch_mult=(1, 2, 2), num_res_blocks=1,
                               attn_resolutions=(), z_channels=8, embed_dim=8, quantizer_config={"num_codes": 32},
                               disc_ndf=8, disc_n_layers=1).eval()


@pytest.mark.parametrize("task", list(CASES))
def test_task_runs_on_the_real_reader(tmp_path, task):
    reader, tree, split, metric = CASES[task]
    root = tree(tmp_path / "data")
    api.list_tasks()
    gin.parse_config(GIN + [f"lgvq.task.{task}.{k}" for k in (
        "train_images = None", f"cache_dir = '{tmp_path / 'cache'}'", "batch_size = 2", "max_images = None")]
        + (["lgvq.task.captioning.meteor = False"] if task == "captioning" else []))
    data = api.create_dataset(reader, root=str(root), split=split, size=32)
    r = run_tasks(tiny_tokenizer(), data, [task], tmp_path / "eval")[task]
    assert r.metrics[metric] is not None and 0.0 <= r.metrics[metric] <= 1.0
    assert r.protocol["images"] == len(data) and r.protocol["split"] == split
