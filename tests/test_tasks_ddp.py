"""Under torchrun every sample counts exactly once: 1 and 2 processes give the same numbers.

9 images over 2 ranks (5 + 4: no padding sample, unlike ``DistributedSampler``); sums and
histograms are all-reduced, FID/KID and retrieval features gathered in sample order, and
the alignment probe of the unguided tokenizer is trained identically on every rank.
"""

from __future__ import annotations

import textwrap

import pytest
from ddp import one_and_two_processes

WORKER = textwrap.dedent('''
    import json, sys
    import gin, torch
    from lgvq_plugins import api
    from lgvq_plugins.evaluation.task import flat_metrics, run_tasks
    from lgvq_plugins.guidance.model import LanguageGuided
    from lgvq_plugins.training import distributed as D

    out, cache = sys.argv[1], sys.argv[2]
    D.setup_distributed()
    torch.set_num_threads(1)
    api.list_tasks()  # load the plugins, so gin knows the registered names
    gin.parse_config([
        "lgvq.task.reconstruction.batch_size = 2",
        "lgvq.task.reconstruction.kid_subset_size = 4",
        f"lgvq.metric.shapes_probe.cache_dir = '{cache}'",
        "lgvq.metric.shapes_probe.num_train = 16",
        "lgvq.metric.shapes_probe.steps = 2",
        "lgvq.metric.shapes_probe.batch_size = 4",
        "alignment_probe.steps = 2",
        "alignment_probe.batch_size = 4",
        "alignment_probe.pool = 16",
        "lgvq.task.masked_word_prediction.batch_size = 2",
        "lgvq.task.code_word_alignment.batch_size = 2",
        "lgvq.task.retrieval.batch_size = 2",
    ])
    torch.manual_seed(0)
    tok = api.create_backbone("vqgan", resolution=32, ch=8, ch_mult=(1, 2), num_res_blocks=1,
                              attn_resolutions=(), z_channels=8, embed_dim=8,
                              quantizer_config={"num_codes": 32}, disc_ndf=8, disc_n_layers=1)
    guided = LanguageGuided(tok, "minilm", width=32, depth=1, heads=2)
    data = api.create_dataset("shapes", split="test", size=32, num_samples=9)
    tasks = ["reconstruction", "masked_word_prediction", "code_word_alignment", "retrieval"]
    results = {"guided": flat_metrics(run_tasks(guided, data, tasks, out + "/guided")),
               "unguided": flat_metrics(run_tasks(guided.tokenizer, data, tasks[2:], out + "/unguided"))}
    images = run_tasks(guided, data, ["reconstruction"], out + "/again")["reconstruction"].protocol["images"]
    results["images"] = images
    if D.is_main_process():
        with open(out + "/metrics.json", "w") as f:
            json.dump(results, f)
    if D.is_distributed():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
''')


@pytest.mark.ddp
def test_one_and_two_processes_give_the_same_numbers(tmp_path):
    found = one_and_two_processes(tmp_path, WORKER, "metrics.json")
    assert found[1]["images"] == found[2]["images"] == 9  # every image once, none twice
    for kind in ("guided", "unguided"):
        one, two = found[1][kind], found[2][kind]
        assert set(one) == set(two)
        assert one["reconstruction/fid"] is not None if kind == "guided" else True
        for name, value in one.items():
            if value is None:
                assert two[name] is None, name
            else:
                assert two[name] == pytest.approx(value, rel=1e-5, abs=1e-7), name
