"""A real 2-process torchrun (gloo, CPU) training from gin on webdataset shards that split
unevenly across the ranks (3 shards vs 2): it does not hang, both ranks take the same number
of steps (the rank with less data starts its next epoch sooner), and the bad samples met by
both ranks' two loader workers are summed in metrics.json and the logs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from data_fixtures import write_shards
from ddp import torchrun

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.ddp
def test_two_ranks_uneven_shards_same_steps_and_summed_bad_counts(tmp_path):
    # 5 shards of 9, in file order (no shuffle, so the split is known): rank 0 reads shards
    # 0, 2, 4 (worker 0: 0 and 4, worker 1: 2), rank 1 reads 1, 3 (one per worker). The first
    # sample of shards 0, 1 and 3 is corrupt. Batches of 4 per worker (each drops its last
    # partial batch): rank 0 has 4 + 2 = 6 batches per epoch, rank 1 has 2 + 2 = 4.
    write_shards(tmp_path / "train", shards=5, per_shard=9,
                 bad={"s0_0": "corrupt", "s1_0": "corrupt", "s3_0": "corrupt"})
    write_shards(tmp_path / "val", shards=2, per_shard=4)
    urls = {"train": str(tmp_path / "train" / "train-{000000..000004}.tar"),
            "val": str(tmp_path / "val" / "train-{000000..000001}.tar")}
    root = tmp_path / "runs"
    bindings = ["Experiment.dataset = 'webdataset'", f"webdataset.urls = {urls!r}",
                "webdataset.size = %IMAGE_SIZE", "webdataset.skip_bad_samples = True",
                "webdataset.shuffle_shards = False", "Trainer.num_workers = 2",
                "MAX_STEPS = 6", "Trainer.ckpt_every = 0", "Trainer.val_every = 0",
                "Experiment.report = False"]
    args = ["-m", "lgvq_plugins.run", "--gin", "gin/tiny.gin", "--root", str(root)]
    for b in bindings:
        args += ["--gin_bindings", b]
    # A rank that ran dry while the other waits in an all-reduce would hang: the timeout fails it.
    torchrun(args, cwd=REPO, env={"HF_HUB_OFFLINE": "1"}, timeout=1200)

    run = root / "tiny"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 6 and metrics["images_seen"] == 48
    state = json.loads((run / "checkpoints" / "step_00000006" / "state.json").read_text())
    rank0, rank1 = state["stream"]
    # Both ranks trained 6 steps: rank 0 within its first epoch of 6 batches, rank 1 through
    # its 4-batch epoch 0 and 2 batches into epoch 1.
    assert (rank0["epoch"], rank0["batches"]) == (0, 6)
    assert (rank1["epoch"], rank1["batches"]) == (1, 2)
    # Bad samples met: rank 0 worker 0 (s0_0, once); rank 1 workers 0 and 1 (s1_0, s3_0, in
    # epoch 0 and again in epoch 1): 1 + 4, only countable summed over ranks and workers.
    train = metrics["data"]["train"]
    assert train["by_kind"] == {"corrupt_image": 5} and train["skipped"] == 5, train
    examples = " ".join(train["examples"]["corrupt_image"])
    assert all(key in examples for key in ("s0_0", "s1_0", "s3_0"))
    logs = [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [e["data_skipped"] for e in logs if "data_skipped" in e][-1] == 5.0


_REPORT_SCRIPT = '''
import json, sys
from lgvq_plugins import api
from lgvq_plugins.training import distributed as D

D.setup_distributed()
rank = D.rank()
images = api.create_dataset("image_text", root=sys.argv[1], split="train", size=32, skip_bad_samples=True)
images[1 if rank == 0 else 4]  # each rank meets one truncated image (and loads the next good one)
shards = api.create_dataset("webdataset", urls=sys.argv[2], split="train", size=16, min_image_side=8,
                            skip_bad_samples=True, shuffle_shards=False)
keys = [s["key"] for s in shards]  # rank 0 reads shard 0, rank 1 shard 1
reports = {"image_text": images.data_report(), "webdataset": shards.data_report(), "keys": keys}
if rank == 0:
    open(sys.argv[3], "w").write(json.dumps(reports))
'''


@pytest.mark.slow
@pytest.mark.ddp
def test_data_reports_count_the_bad_files_of_every_rank(tmp_path):
    """2 torchrun processes: each rank finds a different bad file in a map-style reader and in
    its webdataset shard; rank 0's report (the one metrics.json gets) counts all of them."""
    from data_fixtures import image_text_tree, truncate

    root = image_text_tree(tmp_path / "d", n=10)
    truncate(root / "imgs/001.jpg")
    truncate(root / "imgs/004.jpg")
    write_shards(tmp_path / "s", shards=2, per_shard=3, bad={"s0_1": "corrupt", "s1_2": "no_caption"})
    script = tmp_path / "reports.py"
    script.write_text(_REPORT_SCRIPT)
    out = tmp_path / "reports.json"
    torchrun([str(script), str(root), str(tmp_path / "s" / "train-{000000..000001}.tar"), str(out)],
             cwd=REPO, timeout=600)
    reports = json.loads(out.read_text())
    assert reports["keys"] == ["s0_0", "s0_2"]
    assert reports["image_text"]["by_kind"] == {"truncated_image": 2}  # once per file, both ranks'
    examples = " ".join(reports["image_text"]["examples"]["truncated_image"])
    assert "001.jpg" in examples and "004.jpg" in examples
    assert reports["webdataset"]["by_kind"] == {"corrupt_image": 1, "no_caption": 1}
    assert reports["webdataset"]["skipped"] == 2
