"""The Trainer on a stream (``webdataset`` shards, an IterableDataset): steps not epochs,
endless re-shuffled epochs, a resume that continues with the samples not yet seen (skipping
the consumed shards unopened), bad samples counted across loader workers, and a short run
from gin. The 2-process torchrun checks are in ``test_trainer_stream_ddp.py``."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from data_fixtures import write_shards
from fakes_trainer import FakeGuided, FakeTokenizer
from torch.utils.data import DataLoader

from lgvq_plugins import api
from lgvq_plugins.training.stream import StreamEpochError, TrainStream
from lgvq_plugins.training.trainer import Trainer

SHARDS, PER_SHARD = 4, 5  # 20 samples, keys s{shard}_{i}
EVERY = {f"s{s}_{i}" for s in range(SHARDS) for i in range(PER_SHARD)}


def _shards(tmp_path) -> str:
    write_shards(tmp_path / "shards", shards=SHARDS, per_shard=PER_SHARD)
    return str(tmp_path / "shards" / "train-{000000..000003}.tar")


def _data(urls: str, **kwargs):
    return api.create_dataset("webdataset", urls=urls, split="train", size=16, seed=5, min_image_side=8, **kwargs)


def _trainer(out, data, **kwargs) -> Trainer:
    torch.manual_seed(0)
    settings = dict(max_steps=6, batch_size=4, base_lr=1e-3, scale_lr=False, val_every=0, ckpt_every=0,
                    log_every=0, progress=False, tensorboard=False)
    settings.update(kwargs)
    return Trainer(FakeGuided(FakeTokenizer(disc=False)), data, None, out_dir=out, **settings)


def _record_keys(monkeypatch) -> list[list[str]]:
    """Every micro-batch's sample keys, in the order the trainer trains on them."""
    seen: list[list[str]] = []
    original = Trainer.train_step

    def recording(self, micro):
        seen.extend(list(b["key"]) for b in micro)
        return original(self, micro)

    monkeypatch.setattr(Trainer, "train_step", recording)
    return seen



def _die_at_step(monkeypatch, step: int):
    """Make ``Trainer.train_step`` raise as a killed run would when it reaches ``step``;
    return the original method, to put back for the resumed run."""
    original = Trainer.train_step

    def dies(self, micro):
        if self.step == step:
            raise KeyboardInterrupt("killed")
        return original(self, micro)

    monkeypatch.setattr(Trainer, "train_step", dies)
    return original

def test_streamed_training_counts_steps_and_starts_the_next_epoch_reshuffled(tmp_path, monkeypatch):
    seen = _record_keys(monkeypatch)
    trainer = _trainer(tmp_path / "run", _data(_shards(tmp_path)), max_steps=12)
    summary = trainer.fit()
    assert summary["steps"] == 12 and summary["images_seen"] == 48
    assert trainer.stream is not None and trainer.stream.epoch == 2 and trainer.stream.batches == 2
    flat = [k for batch in seen for k in batch]
    epochs = [flat[0:20], flat[20:40]]
    assert all(sorted(e) == sorted(EVERY) for e in epochs)  # each epoch: every sample exactly once
    assert epochs[0] != epochs[1]  # the next epoch is re-shuffled (shard order by epoch)
    assert "stream_pos" not in trainer.last_train_logs


def test_resume_continues_with_the_samples_not_yet_seen(tmp_path, monkeypatch):
    """Uninterrupted vs killed after step 3 (mid-epoch, mid-shard) and resumed: the same
    micro-batches in the same order and the same weights (no loader workers: exact)."""
    urls = _shards(tmp_path)
    seen = _record_keys(monkeypatch)
    reference = _trainer(tmp_path / "a", _data(urls), max_steps=8, ckpt_every=3)
    reference.fit()
    expected, expected_keys = reference.model.state_dict(), list(seen)
    seen.clear()

    original = _die_at_step(monkeypatch, 4)
    interrupted = _trainer(tmp_path / "b", _data(urls), max_steps=8, ckpt_every=3)
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit()
    before = seen[:3]  # steps 1-3 trained; step 4's batch was drawn but not trained
    monkeypatch.setattr(Trainer, "train_step", original)
    seen2 = _record_keys(monkeypatch)

    data = _data(urls)
    resumed = _trainer(tmp_path / "b", data, max_steps=8, ckpt_every=3)
    assert resumed.resume() == 3
    state = resumed.stream.state_dict()
    # 12 samples consumed = shards 0, 1 of the epoch's order and 2 of the third shard's 5
    assert state["epoch"] == 0 and state["batches"] == 3 and state["positions"] == {"0": [2, 1]}
    # The shards used up before the interruption are not opened again in epoch 0: break them
    # (and mend them when epoch 1, which reads them, starts).
    used_up = {url: Path(url).read_bytes() for url in data.shards_for(0, 1, 0, 1)[:2]}
    for url in used_up:
        Path(url).write_bytes(b"not a tar file")
    set_epoch = data.set_epoch

    def mend_at_epoch_1(epoch):
        if epoch == 1:
            for url, content in used_up.items():
                Path(url).write_bytes(content)
        set_epoch(epoch)

    data.set_epoch = mend_at_epoch_1
    resumed.fit()
    assert before + seen2 == expected_keys
    flat_epoch0 = [k for b in (before + seen2)[:5] for k in b]
    assert sorted(flat_epoch0) == sorted(EVERY)  # nothing seen twice, nothing skipped
    got = resumed.model.state_dict()
    assert all(torch.equal(got[k], expected[k]) for k in expected)


@pytest.mark.slow
def test_resume_with_two_loader_workers_sees_each_sample_once_per_epoch(tmp_path, monkeypatch):
    """With workers the batches interleave differently after a resume, but every worker
    continues right after its last consumed sample: epoch 0 is still each sample once."""
    write_shards(tmp_path / "w", shards=4, per_shard=8)  # 32 samples: 4 batches per worker
    urls = str(tmp_path / "w" / "train-{000000..000003}.tar")
    seen = _record_keys(monkeypatch)
    original = _die_at_step(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        _trainer(tmp_path / "r", _data(urls), max_steps=8, ckpt_every=3, num_workers=2).fit()
    before = seen[:3]
    monkeypatch.setattr(Trainer, "train_step", original)
    after = _record_keys(monkeypatch)
    resumed = _trainer(tmp_path / "r", _data(urls), max_steps=8, ckpt_every=3, num_workers=2)
    resumed.resume()
    resumed.fit()
    epoch0 = Counter(k for b in before + after for k in b)
    assert len(before + after) == 8 and sum(epoch0.values()) == 32
    assert set(epoch0) == {f"s{s}_{i}" for s in range(4) for i in range(8)} and max(epoch0.values()) == 1


def test_shards_fewer_than_ranks_is_an_error_and_an_empty_epoch_is_named(tmp_path):
    write_shards(tmp_path / "one", shards=1, per_shard=3)
    data = _data(str(tmp_path / "one" / "train-000000.tar"))
    with pytest.raises(ValueError, match="1 shard.*cannot feed 2 ranks"):
        TrainStream(data, batch_size=2, world_size=2, rank=0)
    with pytest.warns(UserWarning, match="idle"):
        TrainStream(data, batch_size=2, num_workers=2)
    stream = TrainStream(data, batch_size=4)  # 3 samples: no full batch of 4
    with pytest.raises(StreamEpochError, match="batch_size=4"):
        stream.next_batch()


def test_resume_with_another_worker_count_restarts_the_epoch_and_warns(tmp_path):
    data = _data(_shards(tmp_path))
    stream = TrainStream(data, batch_size=2)
    for _ in range(3):
        stream.next_batch()
    saved = [stream.state_dict()]
    other = TrainStream(data, batch_size=2, num_workers=2)
    with pytest.warns(UserWarning, match="restarts epoch 0"):
        other.load_state_dict(saved)
    assert other.epoch == 0 and other.batches == 0 and other.positions == {}


def test_bad_samples_met_in_loader_workers_are_counted(tmp_path):
    # Each of the two workers reads two shards; each shard has one bad sample.
    bad = {"s0_1": "corrupt", "s1_2": "no_caption", "s2_0": "no_image", "s3_4": "corrupt"}
    write_shards(tmp_path / "bad", shards=4, per_shard=5, bad=bad)
    data = _data(str(tmp_path / "bad" / "train-{000000..000003}.tar"), skip_bad_samples=True)
    keys = [k for b in DataLoader(data, batch_size=2, num_workers=2) for k in b["key"]]
    assert sorted(keys) == sorted(EVERY - set(bad))
    report = data.data_report()
    assert report["skipped"] == 4, report
    assert report["by_kind"] == {"corrupt_image": 2, "missing_image": 1, "no_caption": 1}
    assert sum(len(v) for v in report["examples"].values()) == 4  # the workers' examples too
    assert any("s1_2" in e for e in report["examples"]["no_caption"])


@pytest.mark.slow
def test_gin_run_on_webdataset_shards(tmp_path):
    """``python -m lgvq_plugins.run`` on shards: trains by steps, validates on a val shard,
    writes metrics.json with the data report and a checkpoint holding the stream's position."""
    import json

    import gin
    from lgvq_plugins.run import main

    write_shards(tmp_path / "train", shards=3, per_shard=6, bad={"s1_3": "corrupt"})
    write_shards(tmp_path / "val", shards=1, per_shard=4)
    urls = {"train": str(tmp_path / "train" / "train-{000000..000002}.tar"),
            "val": str(tmp_path / "val" / "train-000000.tar")}
    gin.clear_config()
    metrics = main(["--gin", "tiny.gin", "--root", str(tmp_path / "runs"),
                    "--gin_bindings", "Experiment.dataset = 'webdataset'",
                    "--gin_bindings", f"webdataset.urls = {urls!r}",
                    "--gin_bindings", "webdataset.size = %IMAGE_SIZE",
                    "--gin_bindings", "webdataset.skip_bad_samples = True",
                    "--gin_bindings", "MAX_STEPS = 4", "--gin_bindings", "BATCH_SIZE = 4",
                    "--gin_bindings", "Experiment.report = False"])
    gin.clear_config()
    run = tmp_path / "runs" / "tiny"
    # 17 good samples → 4 full batches: the run ends exactly at the end of epoch 0 (so the bad
    # sample is met once; a stream counts it each epoch that reads it)
    assert metrics["steps"] == 4 and metrics["images_seen"] == 16 and metrics["epochs"] == 0
    assert metrics["data"]["train"]["by_kind"] == {"corrupt_image": 1}
    assert metrics["val_psnr"] > 0
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["data"]["train"]["skipped"] == 1
    state = json.loads((run / "checkpoints" / "step_00000004" / "state.json").read_text())
    assert state["stream"][0]["epoch"] == 0 and state["stream"][0]["batches"] == 4
    logs = [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert any(entry.get("data_skipped") == 1.0 for entry in logs)
