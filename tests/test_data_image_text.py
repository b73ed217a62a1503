"""``image_text`` on fixture trees: the three layouts, splits, the paper's transforms,
every bad-file case (error naming the file, or skipped and counted), and a short training
run from gin."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import gin
from lgvq_plugins import api
from lgvq_plugins.data.bad_samples import BadSampleError
from lgvq_plugins.data.images import load_rgb
from lgvq_plugins.data.transforms import PaperTransform, choose_caption, names_a_side
from data_fixtures import (
    corrupt,
    image_text_tree,
    jpeg_bytes,
    save_image,
    solid_cmyk_jpeg,
    truncate,
)


def build(root, split="train", size=32, **kw):
    return api.create_dataset("image_text", root=str(root), split=split, size=size, **kw)


# -- layouts and splits ------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["jsonl", "csv"])
def test_layout_with_split_field(tmp_path, layout):
    root = image_text_tree(tmp_path / "d", n=10, layout=layout)
    train, val = build(root), build(root, "val")
    assert (len(train), len(val)) == (8, 2)
    sample = train[3]
    assert set(sample) >= {"image", "caption", "index"} and sample["index"] == 3
    assert sample["image"].shape == (3, 32, 32) and sample["image"].dtype == torch.float32
    assert -1.0 <= float(sample["image"].min()) < float(sample["image"].max()) <= 1.0
    assert train.captions(3) == ["a photo number 3", "picture 3 of a red bird"]  # csv rows merged
    assert val[0]["caption"] == "a photo number 8"  # evaluation: the first caption, always
    assert torch.equal(val[0]["image"], val[0]["image"])  # and the center crop


def test_txt_layout_and_hash_split(tmp_path):
    root = image_text_tree(tmp_path / "d", n=60, layout="txt")
    parts = {s: build(root, s) for s in ("train", "val", "test")}
    names = {s: {r.image.name for r in d.records} for s, d in parts.items()}
    assert sum(len(v) for v in names.values()) == 60
    assert not (names["train"] & names["val"]) and not (names["train"] & names["test"])
    assert len(names["train"]) > 40  # ~90 %
    assert {r.image.name for r in build(root, "train").records} == names["train"]  # stable


def test_training_caption_changes_with_epoch_eval_does_not(tmp_path):
    root = image_text_tree(tmp_path / "d", n=10)
    train = build(root)
    seen = set()
    for epoch in range(8):
        train.set_epoch(epoch)
        seen.add(train[0]["caption"])
    assert seen == set(train.captions(0))
    assert {choose_caption(["a", "b"], False, 0, 1, e) for e in range(10)} == {"a"}


def test_wrong_root_shows_the_layout(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        build(tmp_path / "nope")
    assert "captions.jsonl" in str(err.value) and "nope" in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="captions.csv"):
        build(tmp_path / "empty")
    (tmp_path / "bad_csv").mkdir()
    (tmp_path / "bad_csv" / "captions.csv").write_text("file,text\na.jpg,hello\n")
    with pytest.raises(FileNotFoundError, match="'image' and 'caption'"):
        build(tmp_path / "bad_csv")


# -- transforms --------------------------------------------------------------------------

def test_paper_transform_crop_flip_and_side_words():
    image = torch.arange(40 * 60, dtype=torch.int64).reshape(1, 40, 60).remainder(256).to(torch.uint8).repeat(3, 1, 1)
    ev = PaperTransform(40, train=False)
    out, flipped = ev(image, "anything")
    assert not flipped and out.shape == (3, 40, 40)
    assert torch.equal(out, image[:, :, 10:50].float() / 127.5 - 1)  # center crop, no resize needed
    gen = torch.Generator().manual_seed(0)
    tr = PaperTransform(40, train=True, generator=gen)
    flips = [tr(image, "a bird on a branch")[1] for _ in range(40)]
    assert 5 < sum(flips) < 35  # about half
    assert not any(tr(image, "the bird on the LEFT")[1] for _ in range(40))
    assert not any(tr(image, "its right wing")[1] for _ in range(40))
    assert names_a_side("Left side") and not names_a_side("leftover cake") and not names_a_side("bright")
    small = PaperTransform(20, train=True, generator=gen)(image)[0]
    assert small.shape == (3, 20, 20)  # shorter side resized to 20, then cropped


def test_torchvision_decode_matches_pil(tmp_path):
    import numpy as np
    from PIL import Image

    path = tmp_path / "a.jpg"
    path.write_bytes(jpeg_bytes(3))
    ours = load_rgb(path, "t")
    pil = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"))).permute(2, 0, 1)
    assert ours.shape == (3, 40, 48) and (ours.int() - pil.int()).abs().float().mean() < 2.0


def test_large_jpeg_decodes_at_a_reduced_scale_close_to_the_full_decode(tmp_path):
    from PIL import Image as PILImage

    from data_fixtures import photo_like

    path = tmp_path / "big.jpg"
    photo_like(1024, 768).save(path, quality=92)
    full = load_rgb(path, "t")
    reduced = load_rgb(path, "t", min_side=128)
    assert full.shape == (3, 768, 1024) and reduced.shape == (3, 192, 256)  # 1/4 scale in libjpeg
    assert load_rgb(path, "t", min_side=500).shape == (3, 768, 1024)  # 1/2 would be < 500: full
    ev = PaperTransform(128, train=False)
    a, b = ev(full)[0], ev(reduced)[0]
    assert (a - b).abs().mean() < 0.03  # same picture, within JPEG/filtering noise (range 2)
    assert PILImage.open(path).size == (1024, 768)


# -- bad files ---------------------------------------------------------------------------

def _jsonl(root: Path, records: list) -> None:
    (root / "captions.jsonl").write_text("\n".join(r if isinstance(r, str) else json.dumps(r)
                                                   for r in records) + "\n")


def _bad_tree(tmp_path, case):
    """A good image 000 plus one bad case (image 'bad' or a bad caption record)."""
    root = tmp_path / case
    save_image(root / "000.jpg", seed=0)
    good = {"image": "000.jpg", "caption": "a good one", "split": "train"}
    bad = {"image": "bad.jpg", "caption": "a bad one", "split": "train"}
    if case == "missing_image":
        pass
    elif case == "corrupt_image":
        corrupt(root / "bad.jpg")
    elif case == "tiny_image":
        save_image(root / "bad.jpg", size=(4, 4))
    elif case == "no_caption":
        save_image(root / "bad.jpg")
        bad = {"image": "bad.jpg", "split": "train"}
    elif case == "empty_caption":
        save_image(root / "bad.jpg")
        bad = {"image": "bad.jpg", "captions": ["", "  "], "split": "train"}
    elif case == "bad_caption_record":
        bad = '{"image": "bad.jpg", "caption": '  # cut-off JSON line
    _jsonl(root, [good, bad])
    return root


@pytest.mark.parametrize("case", ["missing_image", "corrupt_image", "tiny_image", "no_caption",
                                  "empty_caption", "bad_caption_record"])
def test_bad_file_is_named_or_skipped_and_counted(tmp_path, case):
    root = _bad_tree(tmp_path, case)
    with pytest.raises(BadSampleError) as err:
        build(root)
    message = str(err.value)
    assert err.value.kind == case
    assert ("bad.jpg" in message or "captions.jsonl:2" in message) and "skip_bad_samples" in message
    data = build(root, skip_bad_samples=True)
    assert len(data) == 1 and data[0]["caption"] == "a good one"
    report = data.data_report()
    assert report["skipped"] == 1 and report["by_kind"] == {case: 1}


def test_empty_and_missing_txt_caption_files(tmp_path):
    root = tmp_path / "d"
    for name in ("a", "b", "c"):
        save_image(root / f"{name}.png", seed=1)
    (root / "a.txt").write_text("a caption\n")
    (root / "b.txt").write_text("\n  \n")  # empty caption file; c has none
    kw = {"split_fractions": (1.0, 0.0, 0.0)}
    with pytest.raises(BadSampleError, match="b.png.*empty"):
        build(root, **kw)
    data = build(root, skip_bad_samples=True, **kw)
    assert len(data) == 1 and data.data_report()["by_kind"] == {"empty_caption": 1, "no_caption": 1}


def test_truncated_image_found_when_loaded(tmp_path):
    root = image_text_tree(tmp_path / "d", n=6)
    truncate(root / "imgs/002.jpg")
    strict = build(root)  # the header reads fine: found only when decoded
    with pytest.raises(BadSampleError) as err:
        strict[2]
    assert err.value.kind == "truncated_image" and "002.jpg" in str(err.value)
    lenient = build(root, skip_bad_samples=True)
    sample = lenient[2]
    assert sample["index"] == 3 and sample["caption"] in lenient.captions(3)  # the next good one
    assert lenient.data_report()["by_kind"] == {"truncated_image": 1}


def test_bad_files_found_in_loader_workers_are_counted_once(tmp_path):
    from torch.utils.data import DataLoader

    root = image_text_tree(tmp_path / "d", n=10)
    truncate(root / "imgs/001.jpg")
    truncate(root / "imgs/004.jpg")
    data = build(root, skip_bad_samples=True)
    for _ in range(2):  # two epochs, fresh workers each time
        indices = [int(i) for b in DataLoader(data, batch_size=2, num_workers=2) for i in b["index"]]
        assert 1 not in indices and 4 not in indices and len(indices) == 8
    report = data.data_report()
    assert report["by_kind"] == {"truncated_image": 2} and report["skipped"] == 2
    assert any("001.jpg" in e for e in report["examples"]["truncated_image"])


def test_grayscale_cmyk_rgba_converted_and_counted(tmp_path):
    root = tmp_path / "d"
    save_image(root / "gray.png", mode="L", seed=1)
    save_image(root / "rgba.png", mode="RGBA", seed=2)
    solid_cmyk_jpeg(root / "cmyk.jpg", (0, 255, 255, 0))  # pure red in CMYK
    save_image(root / "pal.gif", mode="P", seed=3)
    _jsonl(root, [{"image": n, "caption": n, "split": "train"}
                  for n in ("gray.png", "rgba.png", "cmyk.jpg", "pal.gif")])
    data = build(root, flip=False)
    assert data.data_report()["converted_to_rgb"] == 4
    for i in range(4):
        assert data[i]["image"].shape == (3, 32, 32)
    gray = data[0]["image"]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    red = data[2]["image"].mean(dim=(1, 2))
    assert red[0] > 0.8 and red[1] < -0.8 and red[2] < -0.8, red


# -- training from gin -------------------------------------------------------------------

def test_short_training_run_on_the_fixture_from_gin(tmp_path):
    from lgvq_plugins.run import main

    root = image_text_tree(tmp_path / "d", n=12, size=(40, 36))
    save_image(root / "imgs/tiny.jpg", size=(5, 5))
    lines = (root / "captions.jsonl").read_text()
    (root / "captions.jsonl").write_text(lines + json.dumps({"image": "imgs/tiny.jpg", "caption": "x",
                                                             "split": "train"}) + "\n")
    gin.clear_config()
    metrics = main(["--gin", "tiny.gin", "--gin", "data/image_text.gin", "--root", str(tmp_path / "runs"),
                    "--gin_bindings", f"image_text.root = '{root}'",
                    "--gin_bindings", "Experiment.dataset = 'image_text'",
                    "--gin_bindings", "IMAGE_SIZE = 32",
                    "--gin_bindings", "image_text.skip_bad_samples = True",
                    "--gin_bindings", "Trainer.max_steps = 2",
                    "--gin_bindings", "Trainer.val_every = 2",
                    "--gin_bindings", "Experiment.eval_batches = 1",
                    "--gin_bindings", "Trainer.val_batches = 1",
                    "--gin_bindings", "Trainer.num_samples = 2",
                    "--gin_bindings", "Experiment.report = False",
                    "--gin_bindings", "BATCH_SIZE = 2"])
    saved = json.loads((tmp_path / "runs" / "tiny" / "metrics.json").read_text())
    assert saved["steps"] == 2 and saved["dataset"] == "image_text"
    assert saved["data"]["train"]["by_kind"] == {"tiny_image": 1} and saved["data"]["train"]["samples"] == 10
    assert saved["data"]["val"]["samples"] == 2
    assert metrics["val_psnr"] == pytest.approx(saved["val_psnr"])
