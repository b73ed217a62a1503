"""The paper's data sets read from fixture trees in their distributed layouts: samples,
splits, extras (labels, masks, questions), wrong roots, and bad files."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from lgvq_plugins import api
from lgvq_plugins.data.bad_samples import BadSampleError
from data_fixtures import (
    celeba_tree,
    coco_qa_tree,
    coco_tree,
    corrupt,
    cub_tree,
    save_image,
    textcaps_tree,
)

READERS = ["cub200", "mm_celeba_hq", "coco_captions", "coco_qa", "textcaps"]


def make(name, root, split="train", size=32, **kw):
    return api.create_dataset(name, root=str(root), split=split, size=size, **kw)


@pytest.mark.parametrize("name", READERS)
def test_wrong_root_shows_the_expected_layout(tmp_path, name):
    (tmp_path / "empty").mkdir()
    for root in (tmp_path / "absent", tmp_path / "empty"):
        with pytest.raises(FileNotFoundError) as err:
            make(name, root)
        message = str(err.value)
        assert "Expected layout" in message and str(root) in message and f"{name}.root" in message


def test_cub200_official_and_attngan_splits(tmp_path):
    root = cub_tree(tmp_path / "cub", n=6)
    train, test = make("cub200", root), make("cub200", root, "val")
    assert (len(train), len(test)) == (3, 3)
    s = train[1]
    assert s["image"].shape == (3, 32, 32) and s["label"] == 1 and s["caption"].startswith("bird 1 caption")
    assert len(train.captions(0)) == 10 and test[0]["caption"] == "bird 3 caption 0"
    for part, names in (("train", ["001.Black_footed_Albatross/Black_footed_Albatross_0000_0"]),
                        ("test", ["002.Laysan_Albatross/Laysan_Albatross_0001_1"])):
        (root / part).mkdir()
        (root / part / "filenames.pickle").write_bytes(pickle.dumps(names, protocol=2))
    assert len(make("cub200", root, split_source="attngan")) == 1
    assert make("cub200", root, "test", split_source="attngan")[0]["label"] == 1


def test_cub200_text_c10_and_missing_caption_file(tmp_path):
    root = cub_tree(tmp_path / "cub", n=4, text_dir="text_c10")
    victim = next((root / "text_c10").rglob("*.txt"))
    victim.unlink()
    with pytest.raises(BadSampleError) as err:
        make("cub200", root)
    assert err.value.kind == "no_caption" and victim.name in str(err.value)
    assert len(make("cub200", root, skip_bad_samples=True)) == 1


@pytest.mark.parametrize("year", [2014, 2017])
def test_coco_captions_reads_file_names_from_the_json(tmp_path, year):
    root = coco_tree(tmp_path / "coco", year)
    train, val = make("coco_captions", root, year=year), make("coco_captions", root, "val", year=year)
    assert (len(train), len(val)) == (4, 2)
    assert val[0]["caption"] == "val image 0 caption 0" and val[0]["image_id"] == 1009
    assert set(train.captions(2)) == {"train image 2 caption 0", "train image 2 caption 1"}
    other = 2017 if year == 2014 else 2014
    with pytest.raises(FileNotFoundError, match=f"captions_train{other}.json"):
        make("coco_captions", root, year=other)


def test_coco_captions_image_without_caption(tmp_path):
    root = coco_tree(tmp_path / "coco", 2014)
    ann_file = root / "annotations" / "captions_train2014.json"
    ann = json.loads(ann_file.read_text())
    ann["annotations"] = [a for a in ann["annotations"] if a["image_id"] != 10]
    ann_file.write_text(json.dumps(ann))
    with pytest.raises(BadSampleError, match="COCO_train2014_000000000010.jpg.*no caption"):
        make("coco_captions", root)
    data = make("coco_captions", root, skip_bad_samples=True)
    assert len(data) == 3 and data.data_report()["by_kind"] == {"no_caption": 1}


def test_coco_qa_questions_answers_and_types(tmp_path):
    root = coco_qa_tree(tmp_path / "coco")
    train, test = make("coco_qa", root), make("coco_qa", root, "test")
    assert (len(train), len(test)) == (4, 2)
    s = train[3]
    assert s["question"] == "what is in picture 9 ?" and s["answer"] == "thing9" and s["qa_type"] == "location"
    assert s["caption"] == s["question"] and test[0]["answer"] == "thing1009"
    (root / "cocoqa" / "train" / "img_ids.txt").write_text("9\n10\n11\n77\n")  # 77: no such image
    with pytest.raises(BadSampleError, match="img_ids.txt:4"):
        make("coco_qa", root)
    assert len(make("coco_qa", root, skip_bad_samples=True)) == 3


def test_mm_celeba_hq_masks_follow_the_image(tmp_path):
    root = celeba_tree(tmp_path / "celeba")
    train, test = make("mm_celeba_hq", root, masks=True), make("mm_celeba_hq", root, "test", masks=True)
    assert (len(train), len(test)) == (3, 2)
    s = test[0]
    assert s["mask"].shape == (32, 32) and s["mask"].dtype == torch.int64
    assert bool((s["mask"][1:, :16] == 1).all()) and bool((s["mask"][:, 16:] == 0).all())  # not flipped in eval
    assert int(s["mask"][0, 0]) == 18 and "mask_path" not in s
    flips = {bool(train[0]["mask"][5, 0] == 0) for _ in range(30)}
    assert flips == {True, False}  # training flips move the mask with the image
    assert "mask" not in make("mm_celeba_hq", root)[0]
    (root / "celeba-caption" / "1.txt").write_text("")
    with pytest.raises(BadSampleError, match="1.txt.*empty"):
        make("mm_celeba_hq", root)
    assert len(make("mm_celeba_hq", root, skip_bad_samples=True)) == 2


def test_mm_celeba_hq_split_from_filenames_pickle(tmp_path):
    root = celeba_tree(tmp_path / "celeba", masks=False)
    (root / "train").mkdir()
    (root / "train" / "filenames.pickle").write_bytes(pickle.dumps(["2", "24001"], protocol=2))
    data = make("mm_celeba_hq", root)
    assert [r.image.name for r in data.records] == ["2.jpg", "24001.jpg"]


def test_textcaps_groups_captions_per_image(tmp_path):
    root = textcaps_tree(tmp_path / "tc")
    train, val = make("textcaps", root), make("textcaps", root, "val")
    assert (len(train), len(val)) == (3, 1)
    assert train.captions(1) == [f"a sign that says aa02 number {k}" for k in range(3)]
    assert val[0]["caption"] == "a sign that says bb01 number 0" and val[0]["image_id"] == "bb01"
    corrupt(root / "train_images" / "aa03.jpg")
    with pytest.raises(BadSampleError, match="aa03.jpg"):
        make("textcaps", root)
    lenient = make("textcaps", root, skip_bad_samples=True)
    assert len(lenient) == 2 and lenient.data_report()["by_kind"] == {"corrupt_image": 1}


@pytest.mark.parametrize("name,builder", [("cub200", cub_tree), ("coco_captions", coco_tree),
                                          ("textcaps", textcaps_tree), ("mm_celeba_hq", celeba_tree)])
def test_tiny_and_grayscale_images_in_every_reader(tmp_path, name, builder):
    root = builder(tmp_path / name)
    images = sorted(p for p in root.rglob("*.jpg"))
    data = make(name, root)
    first = data.records[0].image
    save_image(first, size=(6, 6))
    with pytest.raises(BadSampleError, match="tiny"):
        make(name, root)
    save_image(first, size=(40, 40), mode="L")
    gray = make(name, root)
    assert gray.data_report()["converted_to_rgb"] == 1 and gray[0]["image"].shape == (3, 32, 32)
    assert len(images) >= len(data)
