"""The generation tasks end to end on a tiny ``shapes`` split, in seconds.

A tiny VQ-GAN (32×32 images, 8×8 codes, K=32), a 1-layer CodeGPT trained for a few steps
on 24 cached training images, 6 evaluated images, a few-step ``shapes_probe``.
"""

from __future__ import annotations

import math

import pytest
import torch
from lgvq_plugins.tasks.completion import Completion
from lgvq_plugins.tasks.unconditional import train_split_of

import gin
from lgvq_plugins import api
from lgvq_plugins.evaluation.task import TaskResult, run_tasks

GENERATIVE = ["unconditional", "completion", "text_to_image", "semantic_synthesis"]


# Tiny tensors gain nothing from threads, and a busy 2-core machine makes them far slower.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_tokenizer():
    torch.manual_seed(0)
    return api.create_backbone("vqgan", resolution=32, ch=8, ch_mult=(1, 2, 2), num_res_blocks=1,
                               attn_resolutions=(), z_channels=8, embed_dim=8, quantizer_config={"num_codes": 32},
                               disc_ndf=8, disc_n_layers=1).eval()


def bind_tiny(cache) -> None:
    gin.parse_config([
        f"lgvq.metric.shapes_probe.cache_dir = '{cache}'",
        "lgvq.metric.shapes_probe.num_train = 32",
        "lgvq.metric.shapes_probe.steps = 3",
        f"lgvq.metric.shapes_segmenter.cache_dir = '{cache}'",
        "lgvq.metric.shapes_segmenter.num_train = 16",
        "lgvq.metric.shapes_segmenter.steps = 3",
        "second_stage_training.steps = 6",
        "second_stage_training.batch_size = 4",
        "CodeGPT.width = 32",
        "CodeGPT.depth = 1",
        "CodeGPT.heads = 2",
        *[f"lgvq.task.{t}.{k}" for t in GENERATIVE
          for k in ("train_images = 24", f"cache_dir = '{cache}'", "batch_size = 4", "max_images = 6")],
    ])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cache, out = tmp_path_factory.mktemp("cache"), tmp_path_factory.mktemp("eval")
    gin.clear_config()
    bind_tiny(cache)
    tok = tiny_tokenizer()
    data = api.create_dataset("shapes", split="test", size=32, num_samples=8)
    results = run_tasks(tok, data, GENERATIVE, out)
    yield tok, data, cache, out, results
    gin.clear_config()


def test_every_generation_task_is_registered():
    assert set(GENERATIVE) <= set(api.list_tasks())


@pytest.mark.parametrize("name", GENERATIVE)
def test_task_end_to_end(setup, name):
    _, _, _, out, results = setup
    r = results[name]
    assert isinstance(r, TaskResult)
    assert r.metrics["fid"] is not None and math.isfinite(r.metrics["fid"]) and r.metrics["fid"] >= 0
    # a barely trained prior over 32 codes: cross-entropy near ln 32 (uniform), not far beyond
    assert 0.5 * math.log(32) < r.metrics["nll"] < 2 * math.log(32)
    assert r.metrics["bits_per_code"] == pytest.approx(r.metrics["nll"] / math.log(2))
    assert r.protocol["images"] == 6 and r.protocol["prior"]["train"]["images"] == 24
    assert r.protocol["prior"]["train"]["grid"] == [8, 8]
    assert r.protocol["fid"]["extractor"] == "shapes_probe"
    assert (out / name / r.artefacts["samples"]).is_file()
    assert (out / name / "result.json").is_file()


def test_unconditional_and_completion_share_one_prior(setup):
    results = setup[-1]
    # same codes, same seed, same settings: the same prior, so the same held-out nll
    assert results["unconditional"].metrics["nll"] == pytest.approx(results["completion"].metrics["nll"], rel=1e-6)
    assert results["text_to_image"].metrics["nll"] != pytest.approx(results["unconditional"].metrics["nll"])


def test_text_to_image_reports_caption_match(setup):
    r = setup[-1]["text_to_image"]
    assert 0.0 <= r.metrics["caption_match"] <= 1.0 and 0.0 <= r.metrics["caption_match_real"] <= 1.0
    assert 0.0 <= r.metrics["caption_object_f1"] <= 1.0 and 0.0 <= r.metrics["caption_object_f1_real"] <= 1.0
    assert r.protocol["conditioning"] == "text"


def test_caption_match_needs_the_segmenter_not_the_fid_extractor(setup, tmp_path):
    tok, data, cache, *_ = setup
    bind_tiny(cache)  # conftest clears gin around every test
    gin.parse_config(["lgvq.task.text_to_image.fid_extractor = None"])
    r = run_tasks(tok, data, ["text_to_image"], tmp_path / "no_fid")["text_to_image"]
    assert r.metrics["fid"] is None and "fid" in r.unavailable
    assert 0.0 <= r.metrics["caption_object_f1"] <= 1.0 and r.protocol["caption_match"]["min_object_pixels"] == 4
    gin.parse_config(["lgvq.task.text_to_image.segmenter = None"])
    r = run_tasks(tok, data, ["text_to_image"], tmp_path / "no_reader")["text_to_image"]
    for key in ("caption_match", "caption_match_real", "caption_object_f1", "caption_object_f1_real"):
        assert r.metrics[key] is None and "segmenter = None" in r.unavailable[key]


def test_a_second_run_resumes_the_trained_prior(setup, monkeypatch):
    tok, data, cache, out, results = setup
    bind_tiny(cache)
    import lgvq_plugins.tasks.unconditional as unc

    steps = []
    real = unc.train_code_gpt
    monkeypatch.setattr(unc, "train_code_gpt", lambda *a, **k: steps.append(real(*a, **k)["steps"]) or
                        {"loss": 0.0, "steps": steps[-1], "codes_per_s": None})
    again = run_tasks(tok, data, ["unconditional"], out)["unconditional"]
    assert steps == [6]  # loaded at its final step: no update taken
    assert again.metrics["nll"] == pytest.approx(results["unconditional"].metrics["nll"], rel=1e-6)
    assert again.metrics["fid"] == pytest.approx(results["unconditional"].metrics["fid"], rel=1e-6)


def test_completion_gives_the_top_half_rows():
    codes = torch.arange(2 * 8 * 8).reshape(2, 64)
    assert torch.equal(Completion().given(codes, (8, 8)), codes[:, :32])
    assert Completion(given_rows=3).given(codes, (8, 8)).shape == (2, 24)


def test_semantic_prefix_holds_class_fractions_per_code_cell(setup):
    from lgvq_plugins.tasks.semantic_synthesis import SemanticSynthesis

    semantic = torch.zeros(4, 4, dtype=torch.long)
    semantic[:2, :2] = 1  # top-left cell: all class 1
    semantic[2:, 2:3] = 3  # bottom-right cell: half class 3
    task = SemanticSynthesis(num_classes=4)
    task.grid = (2, 2)
    prefix, mask = task.prefix([{"semantic": semantic}], [0], torch.zeros(1, 4, dtype=torch.long))
    assert prefix.shape == (1, 4, 4) and mask.all()
    assert prefix[0].tolist() == [[0, 1, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0], [0.5, 0, 0, 0.5]]
    with pytest.raises(ValueError, match="num_classes"):
        SemanticSynthesis(num_classes=3).prefix([{"semantic": semantic}], [0], torch.zeros(1, 4))


def test_semantic_synthesis_scores_the_generated_images_by_miou(setup):
    r = setup[-1]["semantic_synthesis"]
    assert 0.0 <= r.metrics["miou"] <= 1.0 and 0.0 <= r.metrics["miou_real"] <= 1.0
    seg = r.protocol["miou"]
    assert seg["segmenter"] == "shapes_segmenter" and seg["settings"]["steps"] == 3
    per_class = seg["iou_per_class"]["miou"]
    assert len(per_class) == 6  # background + 5 shapes
    present = [v for v in per_class if v is not None]
    assert r.metrics["miou"] == pytest.approx(sum(present) / len(present), abs=1e-4)


def test_semantic_synthesis_miou_is_unavailable_without_a_segmenter(setup, tmp_path):
    tok, data, cache, *_ = setup
    bind_tiny(cache)
    gin.parse_config(["lgvq.task.semantic_synthesis.segmenter = None"])
    r = run_tasks(tok, data, ["semantic_synthesis"], tmp_path)["semantic_synthesis"]
    assert r.metrics["miou"] is None and r.metrics["miou_real"] is None
    assert "segmenter = None" in r.unavailable["miou"] and r.metrics["fid"] is not None


def test_the_prior_never_trains_on_the_evaluated_split(setup):
    data = setup[1]
    with pytest.raises(ValueError, match="train_split"):
        train_split_of(data, "test", 4)
    train = train_split_of(data, "train", 4)
    assert train.split == "train" and len(train) == 4 and train.size == data.size
