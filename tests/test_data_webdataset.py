"""WebDataset shards: 2 ranks × 2 DataLoader workers read every sample exactly once per
epoch (reshuffled per epoch), and bad samples in shards are named or skipped."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from lgvq_plugins import api
from lgvq_plugins.data.bad_samples import BadSampleError
from data_fixtures import write_shards


def _keys(data, workers: int) -> list[str]:
    loader = DataLoader(data, batch_size=4, num_workers=workers)
    return [k for batch in loader for k in batch["key"]]


def test_two_ranks_two_workers_cover_every_sample_exactly_once(tmp_path):
    write_shards(tmp_path / "s", shards=8, per_shard=5)
    pattern = str(tmp_path / "s" / "train-{000000..000007}.tar")
    every = {f"s{s}_{i}" for s in range(8) for i in range(5)}
    orders = []
    for epoch in (0, 1):
        seen: list[str] = []
        for rank in (0, 1):
            data = api.create_dataset("webdataset", urls=pattern, split="train", size=32, rank=rank,
                                      world_size=2, seed=3)
            data.set_epoch(epoch)
            keys = _keys(data, workers=2)
            assert len(keys) == 20  # 8 shards / 2 ranks: 4 shards, 2 per worker
            seen += keys
        assert sorted(seen) == sorted(every)  # exactly once: no sample missing, none twice
        orders.append(seen)
    assert orders[0] != orders[1]  # shards reshuffled per epoch


def test_shard_assignment_is_a_partition():
    from lgvq_plugins.data.webdataset import WebDatasetCaptions

    data = WebDatasetCaptions.__new__(WebDatasetCaptions)
    data.urls, data.shuffle_shards, data.seed, data.epoch = [f"u{i}" for i in range(12)], True, 0, 5
    parts = [data.shards_for(r, 3, w, 2) for r in range(3) for w in range(2)]
    assert sorted(u for p in parts for u in p) == sorted(data.urls) and all(len(p) == 2 for p in parts)


def test_samples_and_eval_caption(tmp_path):
    write_shards(tmp_path / "s", shards=1, per_shard=3)
    data = api.create_dataset("webdataset", urls=str(tmp_path / "s" / "train-000000.tar"), split="val",
                              size=24, rank=0, world_size=1)
    samples = list(data)
    assert [s["key"] for s in samples] == ["s0_0", "s0_1", "s0_2"]
    assert samples[0]["image"].shape == (3, 24, 24) and samples[0]["caption"] == "caption of s0_0"


@pytest.mark.parametrize("kind,expected", [("corrupt", "corrupt_image"), ("no_caption", "no_caption"),
                                           ("no_image", "missing_image")])
def test_bad_samples_in_shards(tmp_path, kind, expected):
    write_shards(tmp_path / "s", shards=1, per_shard=4, bad={"s0_2": kind})
    url = str(tmp_path / "s" / "train-000000.tar")
    strict = api.create_dataset("webdataset", urls=url, size=24, rank=0, world_size=1)
    with pytest.raises(BadSampleError) as err:
        list(strict)
    assert err.value.kind == expected and "s0_2" in str(err.value)
    lenient = api.create_dataset("webdataset", urls=url, size=24, rank=0, world_size=1, skip_bad_samples=True)
    assert sorted(s["key"] for s in lenient) == ["s0_0", "s0_1", "s0_3"]
    assert lenient.data_report()["by_kind"] == {expected: 1}


def test_missing_shards_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-000003.tar"):
        api.create_dataset("webdataset", urls=str(tmp_path / "train-{000003..000004}.tar"))
    with pytest.raises(ValueError, match="no shards for split 'val'"):
        api.create_dataset("webdataset", urls={"train": "x.tar"}, split="val")


def test_grayscale_and_cmyk_members_are_converted_and_counted(tmp_path):
    import io
    import tarfile

    from PIL import Image

    members = {}
    for key, image, fmt in (("gray", Image.new("L", (40, 40), 128), "PNG"),
                            ("cmyk", Image.new("CMYK", (40, 40), (0, 255, 255, 0)), "JPEG"),
                            ("rgb", Image.new("RGB", (40, 40), (0, 0, 255)), "PNG")):
        buf = io.BytesIO()
        image.save(buf, fmt)
        members[f"{key}.{'png' if fmt == 'PNG' else 'jpg'}"] = buf.getvalue()
        members[f"{key}.txt"] = f"a {key} square".encode()
    path = tmp_path / "mixed.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = api.create_dataset("webdataset", urls=str(path), split="val", size=32, rank=0, world_size=1)
    samples = {s["key"]: s for s in data}
    assert data.data_report()["converted_to_rgb"] == 2
    red = samples["cmyk"]["image"].mean(dim=(1, 2))
    assert red[0] > 0.8 and red[1] < -0.8 and red[2] < -0.8, red
    gray = samples["gray"]["image"]
    assert torch.equal(gray[0], gray[1]) and abs(float(gray.mean()) - (128 / 127.5 - 1)) < 0.01
