"""``lgvq cache-text``: every caption of a data set encoded once into the on-disk cache,
which a later cache (another rank, the training run) then serves without encoding."""

from __future__ import annotations

import json

import pytest

import gin
from lgvq_plugins import api
from lgvq_plugins.cli import main
from lgvq_plugins.data.caption_features import dataset_captions
from lgvq_plugins.text.cache import TextFeatureCache
from data_fixtures import image_text_tree


def test_cache_text_encodes_each_caption_once_and_training_finds_them(tmp_path, capsys):
    root = image_text_tree(tmp_path / "d", n=10)
    cache_dir = tmp_path / "cache"
    argv = ["cache-text", "--gin", "data/image_text.gin", "--gin_bindings", f"image_text.root = '{root}'",
            "--gin_bindings", "Experiment.dataset = 'image_text'", "--gin_bindings", "IMAGE_SIZE = 32",
            "--cache-dir", str(cache_dir), "--batch-size", "3", "--no-progress"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["train"] == {"captions": 16, "encoded": 16, "already_cached": 0}  # 8 images × 2
    assert report["val"]["captions"] == 4 and report["text_encoder"] == "minilm"
    gin.clear_config()
    assert main(argv) == 0  # a second pass finds everything on disk
    assert json.loads(capsys.readouterr().out)["train"]["encoded"] == 0
    # a fresh cache (as a DDP rank or the training run builds it) serves every caption from disk
    cache = TextFeatureCache(api.create_text_encoder("minilm"), cache_dir=cache_dir)
    train = api.create_dataset("image_text", root=str(root), split="train", size=32)
    cache.cache(dataset_captions(train))
    assert cache.stats.misses == 0 and cache.stats.disk_hits == 16


def test_cache_text_needs_a_folder(tmp_path):
    root = image_text_tree(tmp_path / "d", n=4)
    with pytest.raises(ValueError, match="LanguageGuided.cache_dir"):
        main(["cache-text", "--gin", "data/image_text.gin", "--gin_bindings", f"image_text.root = '{root}'",
              "--gin_bindings", "Experiment.dataset = 'image_text'", "--no-progress"])


def test_dataset_captions_for_shapes():
    data = api.create_dataset("shapes", split="val", size=32, num_samples=3)
    caps = dataset_captions(data)
    assert len(caps) == len(set(caps)) and set(data.captions(0)) <= set(caps)
