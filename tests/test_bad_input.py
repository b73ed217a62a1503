"""Bad input gets a clear error naming what and where, or — with ``Trainer.skip_bad_samples``
— a counted skip; a data set without captions trains with guidance off."""

from __future__ import annotations

import json

import pytest
import torch
from fakes import CAPTIONS, FakeTextEncoder, FakeTokenizer
from torch.utils.data import Dataset

from lgvq_plugins.guidance import LanguageGuided
from lgvq_plugins.guidance.inputs import check_captions, check_images
from lgvq_plugins.training.batch_checks import collate_samples, drop_bad_samples
from lgvq_plugins.training.trainer import Trainer

SMALL = {"width": 32, "heads": 4}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one thread is faster, and spares a shared CPU (restored afterwards)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _images(b: int = 4, size: int = 16) -> torch.Tensor:
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1


def _guided(**kwargs) -> LanguageGuided:
    torch.manual_seed(0)
    return LanguageGuided(FakeTokenizer(), FakeTextEncoder(), **{**SMALL, **kwargs})


# ---------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------

BAD_CAPTIONS = [
    (None, r"batch position 2 \(dataset index 12\): a NoneType \(None\), not a string"),
    (3, r"batch position 2 \(dataset index 12\): a int \(3\), not a string"),
    ("", r"batch position 2 \(dataset index 12\): empty \(''\)"),
    ("  \t", r"batch position 2 \(dataset index 12\): empty \('  \\t'\)"),
]


@pytest.mark.parametrize(("bad", "message"), BAD_CAPTIONS)
def test_bad_caption_is_named_with_its_position_and_dataset_index(bad, message):
    captions = list(CAPTIONS[:4])
    captions[2] = bad
    batch = {"caption": captions, "index": torch.tensor([10, 11, 12, 13])}
    model = _guided().train()
    with pytest.raises(ValueError, match=message) as err:
        model(_images(), captions, batch)
    assert "skip_bad_samples" in str(err.value)  # the way out is named
    # without an index field the position alone is named
    with pytest.raises(ValueError, match=r"batch position 2: "):
        check_captions(captions)


def test_several_bad_captions_are_all_named():
    with pytest.raises(ValueError, match=r"bad captions — batch position 0: .*; batch position 3: "):
        check_captions([None, "a", "b", ""])


# ---------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------

BAD_IMAGES = [
    ("one channel", torch.zeros(2, 1, 16, 16), ValueError, r"got 1 channels, shape \(2, 1, 16, 16\)"),
    ("four channels", torch.zeros(2, 4, 16, 16), ValueError, r"got 4 channels"),
    ("channels last", torch.zeros(2, 16, 16, 3), ValueError, r"channels last\? use x.permute\(0, 3, 1, 2\)"),
    ("uint8", torch.zeros(2, 3, 16, 16, dtype=torch.uint8), TypeError, r"got dtype torch.uint8 .* x.float\(\) / 127.5 - 1"),
    ("0..255 floats", torch.full((2, 3, 16, 16), 200.0), ValueError, r"got values in \[200, 200\] — \[0, 255\] data\?"),
    ("below -1", torch.full((2, 3, 16, 16), -3.0), ValueError, r"got values in \[-3, -3\]"),
    ("empty batch", torch.zeros(0, 3, 16, 16), ValueError, r"got an empty batch \(shape \(0, 3, 16, 16\)\)"),
    ("no batch dim", torch.zeros(3, 16, 16), ValueError, r"got a tensor of shape \(3, 16, 16\)"),
    ("a list", [[0.0]], TypeError, r"got a list"),
]


@pytest.mark.parametrize(("name", "images", "kind", "message"), BAD_IMAGES, ids=[c[0] for c in BAD_IMAGES])
@pytest.mark.parametrize("enabled", [True, False])
def test_bad_images_say_what_was_expected_and_what_arrived(name, images, kind, message, enabled):
    model = _guided(enabled=enabled).train()
    captions = CAPTIONS[:2] if enabled else None
    with pytest.raises(kind, match=message) as err:
        model(images, captions)
    assert r"(B, 3, H, W) floating-point images with values in [-1, 1]" in str(err.value)


def test_images_at_the_edge_of_the_range_pass():
    check_images(torch.tensor([-1.05, 1.08]).view(1, 1, 1, 2).expand(1, 3, 2, 2))  # resampling overshoot
    check_images(_images().half())


# ---------------------------------------------------------------------------------------
# The trainer: skip and count, collation, no captions with guidance off
# ---------------------------------------------------------------------------------------


class Squares(Dataset):
    """16 px images in [-1, 1] with a caption (or ``caption_at`` overrides, or none)."""

    def __init__(self, size: int = 16, caption_at: dict[int, object] | None = None, captions: bool = True):
        self.size, self.caption_at, self.captions = size, caption_at or {}, captions

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        gen = torch.Generator().manual_seed(index)
        sample = {"image": torch.rand(3, 16, 16, generator=gen) * 2 - 1, "index": index}
        if self.captions:
            sample["caption"] = self.caption_at.get(index, CAPTIONS[index % len(CAPTIONS)])
        return sample


def _trainer(tmp_path, data: Dataset, enabled: bool = True, **kwargs) -> Trainer:
    settings = {"max_steps": 3, "batch_size": 4, "val_every": 0, "ckpt_every": 0, "log_every": 1,
                "progress": False, "tensorboard": False, "base_lr": 1e-3, "scale_lr": False, "device": "cpu"}
    return Trainer(_guided(enabled=enabled), data, None, out_dir=tmp_path, **{**settings, **kwargs})


def test_collate_keeps_bad_captions_to_be_named():
    samples = [Squares(caption_at={1: None, 2: 7})[i] for i in range(3)]
    batch = collate_samples(samples)
    assert batch["caption"] == [CAPTIONS[0], None, 7] and batch["image"].shape == (3, 3, 16, 16)
    assert batch["index"].tolist() == [0, 1, 2]
    assert "caption" not in collate_samples([Squares(captions=False)[0]])


def test_trainer_error_names_the_dataset_index(tmp_path):
    trainer = _trainer(tmp_path, Squares(size=8, caption_at={5: None}), max_steps=2)
    with pytest.raises(ValueError, match=r"\(dataset index 5\): a NoneType"):
        trainer.fit()


def test_skip_bad_samples_skips_and_counts(tmp_path):
    bad = {1: None, 6: "", 9: 3}
    trainer = _trainer(tmp_path, Squares(caption_at=bad), skip_bad_samples=True, max_steps=4)
    summary = trainer.fit()  # one epoch of four batches: each bad sample met once
    assert summary["skipped_samples"] == 3.0
    logged = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    counts = [e["skipped_samples"] for e in logged if "skipped_samples" in e]
    assert counts[-1] == 3.0 and counts == sorted(counts) and len(counts) == 4


def test_drop_bad_samples_keeps_the_rest_aligned():
    batch = collate_samples([Squares(caption_at={1: None, 3: " "})[i] for i in range(4)])
    kept, dropped = drop_bad_samples(batch)
    assert dropped == 2 and kept["index"].tolist() == [0, 2]
    assert kept["caption"] == [CAPTIONS[0], CAPTIONS[2]]
    assert torch.equal(kept["image"], batch["image"][[0, 2]])
    with pytest.raises(ValueError, match=r"every sample of this batch has a bad caption"):
        drop_bad_samples({"image": batch["image"][:2], "caption": [None, ""], "index": [0, 1]})
    assert drop_bad_samples({"image": batch["image"]})[1] == 0  # no captions: nothing to drop


def test_guidance_off_trains_on_a_dataset_without_captions(tmp_path):
    trainer = _trainer(tmp_path, Squares(size=8, captions=False), enabled=False, max_steps=2)
    summary = trainer.fit()
    assert summary["steps"] == 2.0
    with pytest.raises(ValueError, match="got no captions"):  # guidance on still needs them
        _trainer(tmp_path / "on", Squares(size=8, captions=False), max_steps=1).fit()


@pytest.mark.ddp
def test_skip_bad_samples_keeps_ranks_equal_under_ddp():
    """2 gloo processes with 1 and 2 bad captions: both keep 2 good samples, 3 counted."""
    from pathlib import Path

    from ddp import torchrun

    script = Path(__file__).resolve().parent / "scripts" / "skip_bad_ddp_worker.py"
    proc = torchrun([str(script)], nproc=2, timeout=120)
    assert "rank 0: skip ddp ok" in proc.stdout and "rank 1: skip ddp ok" in proc.stdout
