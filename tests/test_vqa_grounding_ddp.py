"""``vqa`` and ``grounding`` under torchrun: every rank's answers and boxes are gathered in
sample order, so 1 and 2 processes give the same numbers (9 samples: 5 + 4 over 2 ranks).

Without the gathering each rank would score its own share only (5 or 4 samples), and the
examples table would list 5 samples instead of 9.
"""

from __future__ import annotations

import textwrap

import pytest
from ddp import one_and_two_processes

WORKER = textwrap.dedent('''
    import json, sys
    import gin, torch
    from lgvq_plugins import api
    from lgvq_plugins.evaluation.task import run_tasks
    from lgvq_plugins.training import distributed as D

    out, cache = sys.argv[1], sys.argv[2]
    D.setup_distributed()
    torch.set_num_threads(1)
    api.list_tasks()  # load the plugins, so gin knows the registered names
    gin.parse_config(["second_stage_training.steps = 6", "second_stage_training.batch_size = 4",
                      "CodeReader.width = 32", "CodeReader.depth = 1", "CodeReader.heads = 2"]
                     + [f"lgvq.task.{t}.{k}" for t in ("vqa", "grounding") for k in (
                        "train_images = 24", f"cache_dir = '{cache}'", "batch_size = 2", "max_images = 9")])
    torch.manual_seed(0)
    tok = api.create_backbone("vqgan", resolution=32, ch=8, ch_mult=(1, 2, 2), num_res_blocks=1,
                              attn_resolutions=(), z_channels=8, embed_dim=8, quantizer_config={"num_codes": 32},
                              disc_ndf=8, disc_n_layers=1).eval()
    data = api.create_dataset("shapes", split="test", size=32, num_samples=12)
    results = run_tasks(tok, data, ["vqa", "grounding"], out + "/eval")
    found = {name: {"metrics": r.metrics, "unavailable": r.unavailable, "images": r.protocol["images"],
                    "examples": r.tables["examples"]} for name, r in results.items()}
    if D.is_main_process():
        with open(out + "/found.json", "w") as f:
            json.dump(found, f)
    if D.is_distributed():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
''')


@pytest.mark.ddp
def test_vqa_and_grounding_score_every_sample_once_under_torchrun(tmp_path):
    found = one_and_two_processes(tmp_path, WORKER, "found.json")
    for name in ("vqa", "grounding"):
        one, two = found[1][name], found[2][name]
        assert one["images"] == two["images"] == 9
        # every evaluated sample once, in sample order, on rank 0 of the 2-process run
        assert [e["index"] for e in two["examples"]] == [e["index"] for e in one["examples"]] == list(range(9))
        assert two["unavailable"] == one["unavailable"]
        assert set(one["metrics"]) == set(two["metrics"])
        for metric, value in one["metrics"].items():
            if value is None:
                assert two["metrics"][metric] is None, metric
            else:
                assert two["metrics"][metric] == pytest.approx(value, rel=1e-5, abs=1e-6), (name, metric)
    vqa_one, vqa_two = found[1]["vqa"]["examples"], found[2]["vqa"]["examples"]
    assert [e["predicted"] for e in vqa_two] == [e["predicted"] for e in vqa_one]
    iou_one = [e["iou"] for e in found[1]["grounding"]["examples"]]
    assert [e["iou"] for e in found[2]["grounding"]["examples"]] == pytest.approx(iou_one, rel=1e-5, abs=1e-6)
