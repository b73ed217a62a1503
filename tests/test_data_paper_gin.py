"""gin/paper/: every run file parses with the paper's numbers and builds (data, tokenizer,
guidance, trainer) on a tiny fixture tree of its data set's layout."""

from __future__ import annotations

from pathlib import Path

import pytest

import gin
from lgvq_plugins.config import parse_gin
from data_fixtures import celeba_tree, coco_tree, cub_tree, textcaps_tree

REPO = Path(__file__).resolve().parent.parent
PAPER = REPO / "gin" / "paper"
RUN_FILES = sorted(p.name for p in PAPER.glob("*.gin"))
BUILDERS = {"cub200": cub_tree, "mm_celeba_hq": celeba_tree, "coco_captions": coco_tree, "textcaps": textcaps_tree}
WEIGHTS = {"cub200": {"gsa": 0.001, "mtp": 0.001, "ras": 0.001}}
DEFAULT_WEIGHTS = {"gsa": 0.001, "mtp": 0.01, "ras": 0.0001}


def _parts(name: str) -> tuple[str, str, bool]:
    stem = name[:-4]
    guided = stem.endswith("_lg")
    stem = stem[:-3] if guided else stem
    data, _, model = stem.rpartition("_")
    return data, model, guided


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("paper_data")
    return {name: str(build(base / name)) for name, build in BUILDERS.items()}


def test_every_data_set_and_model_has_both_run_files():
    assert len(RUN_FILES) == 24
    assert {_parts(n) for n in RUN_FILES} == {(d, m, g) for d in BUILDERS for m in ("vqvae", "vqgan", "cvq")
                                              for g in (True, False)}


def _value(v):
    """A bound value with gin macros (``%IMAGE_SIZE``) replaced by what they hold."""
    if isinstance(v, gin.config.ConfigurableReference):
        return gin.query_parameter(repr(v))  # repr is "%NAME"
    if isinstance(v, dict):
        return {k: _value(x) for k, x in v.items()}
    return v


@pytest.mark.parametrize("name", RUN_FILES)
def test_paper_run_file_has_the_paper_settings(name, roots):
    data, model, guided = _parts(name)
    parse_gin([PAPER / name], [f"{data}.root = '{roots[data]}'"])

    def q(key):
        return _value(gin.query_parameter(key))
    assert q("Experiment.name") == name[:-4] and q("Experiment.dataset") == data
    assert q("Experiment.backbone") == ("vqvae" if model == "vqvae" else "vqgan")
    backbone = q("Experiment.backbone")
    assert q(f"{backbone}.quantizer") == ("cvq" if model == "cvq" else "vq")
    assert q(f"{backbone}.quantizer_config") == {"num_codes": 1024} and q(f"{backbone}.embed_dim") == 256
    assert q(f"{data}.size") == 256 and q("Trainer.batch_size") == 8 and q("Trainer.base_lr") == 4.5e-6
    assert tuple(q("Trainer.betas")) == (0.5, 0.9) and q("vqgan.disc_start") == 10000
    assert q("LanguageGuided.enabled") is guided
    if guided:
        assert q("LanguageGuided.losses") == WEIGHTS.get(data, DEFAULT_WEIGHTS)
        assert q("LanguageGuided.text_encoder") == "open_clip" and q("open_clip.model_name") == "ViT-B-32"
        assert q("open_clip.max_length") == 30
    if backbone == "vqgan":
        assert q("vqgan.perceptual") == "lpips" and q("vqgan.disc_weight") == 0.8


@pytest.mark.slow
@pytest.mark.parametrize("name", RUN_FILES)
def test_paper_run_file_builds_on_a_fixture_tree(name, roots, tmp_path):
    """The full-size model (random CLIP text tower, no LPIPS weights offline) on the fixture."""
    from lgvq_plugins.training.experiment import Experiment

    data, _, guided = _parts(name)
    parse_gin([PAPER / name], [f"{data}.root = '{roots[data]}'", "open_clip.pretrained = None",
                               "vqgan.perceptual = 'none'", f"Experiment.root = '{tmp_path}'",
                               "Trainer.max_steps = 1", "BATCH_SIZE = 1", "Trainer.val_batches = 1"])
    exp = Experiment().build()
    try:
        assert exp.model.enabled is guided and exp.model.tokenizer.lgvq_registry_name == exp.backbone
        train = exp.trainer.train_data
        assert type(train).NAME == data and len(train) >= 1
        sample = train[0]
        assert sample["image"].shape == (3, 256, 256) and isinstance(sample["caption"], str)
        assert tuple(exp.model.tokenizer.grid(256)) == (16, 16)
    finally:
        exp.trainer.close()


@pytest.mark.slow
def test_paper_run_file_trains_on_the_cub_fixture(roots, tmp_path):
    """The acceptance command on the CUB layout, shrunk to seconds: the paper's run file with
    its data/guidance/schedule blocks, a small model and the random CLIP text tower."""
    import json

    from lgvq_plugins.run import main

    small = ["IMAGE_SIZE = 32", "NUM_CODES = 32", "CODE_DIM = 8", "vqgan.ch = 8", "vqgan.ch_mult = (1, 2)",
             "vqgan.num_res_blocks = 1", "vqgan.attn_resolutions = ()", "vqgan.disc_ndf = 8",
             "vqgan.disc_n_layers = 1", "vqgan.perceptual = 'none'", "open_clip.pretrained = None",
             "LanguageGuided.width = 32", "LanguageGuided.heads = 2", "MAX_STEPS = 2", "BATCH_SIZE = 2",
             "Trainer.val_every = 2", "Trainer.val_batches = 1", "Trainer.num_samples = 2",
             "Experiment.eval_batches = 1", "Experiment.report = False", "Trainer.progress = False"]
    args = ["--gin", str(PAPER / "cub200_cvq_lg.gin"), "--root", str(tmp_path),
            "--gin_bindings", f"cub200.root = '{roots['cub200']}'"]
    for binding in small:
        args += ["--gin_bindings", binding]
    metrics = main(args)
    saved = json.loads((tmp_path / "cub200_cvq_lg" / "metrics.json").read_text())
    assert saved["steps"] == 2 and saved["dataset"] == "cub200" and saved["guidance"] is True
    assert saved["data"]["train"]["samples"] == 3 and saved["data"]["train"]["skipped"] == 0
    assert metrics["val_psnr"] == pytest.approx(saved["val_psnr"])
