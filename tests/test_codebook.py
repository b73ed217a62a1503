"""One implementation of codebook usage/perplexity (quantizers, metric, example plugin) and
PSNR through torchmetrics: hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from lgvq_plugins.evaluation.codebook import code_histogram, codebook_stats
from lgvq_plugins.evaluation.metrics import PSNR, CodebookUsage

INDICES = torch.tensor([[0, 0], [1, 3]])  # K = 4: p = (1/2, 1/4, 0, 1/4)
PERPLEXITY = 2 ** 1.5  # H = 1.5 · ln 2


def test_histogram_and_stats_hand_computed():
    counts = code_histogram(INDICES, 4)
    assert counts.tolist() == [2, 1, 0, 1] and counts.dtype == torch.int64
    usage, perplexity = codebook_stats(counts)
    assert usage.item() == pytest.approx(0.75) and perplexity.item() == pytest.approx(PERPLEXITY, rel=1e-6)
    assert codebook_stats(torch.ones(8)).perplexity.item() == pytest.approx(8.0, rel=1e-6)  # uniform: K
    empty = codebook_stats(torch.zeros(5))
    assert (empty.usage.item(), empty.perplexity.item()) == (0.0, 1.0)
    # float64 in, float64 out (the metric's exact path); weights need not be integers
    stats = codebook_stats(torch.tensor([0.2, 0.1, 0.0, 0.1], dtype=torch.float64))
    assert stats.perplexity.dtype == torch.float64
    assert stats.perplexity.item() == pytest.approx(PERPLEXITY)
    with pytest.raises(ValueError, match=r"outside \[0, 4\).*max 4.*num_codes"):
        code_histogram(torch.tensor([4]), 4)


def test_quantizers_metric_and_example_plugin_agree():
    """Every user of the numbers gets them from codebook_stats (changing it changes all)."""
    from lgvq_plugins.backbones import quant_base
    from lgvq_plugins.backbones.quant_base import usage_stats
    from lgvq_plugins.evaluation import metrics

    assert quant_base.codebook_stats is codebook_stats and metrics.codebook_stats is codebook_stats
    stats = usage_stats(code_histogram(INDICES, 4).float())
    metric = CodebookUsage(num_codes=4)
    metric.update(INDICES)
    out = metric.compute()
    for result in (stats, out):
        assert result["usage"].item() == pytest.approx(0.75)
        assert result["perplexity"].item() == pytest.approx(PERPLEXITY, rel=1e-6)
    with pytest.raises(ValueError, match="codebook_usage: .*num_codes"):
        metric.update(torch.tensor([-1]))


@pytest.mark.requires_vqtorch
def test_example_plugin_uses_the_same_function():
    import lgvq_vqtorch.plugin as plugin

    assert plugin.codebook_stats is codebook_stats and plugin.code_histogram is code_histogram
    example = plugin._usage_stats(INDICES, 4)
    assert example["usage"].item() == pytest.approx(0.75)
    assert example["perplexity"].item() == pytest.approx(PERPLEXITY, rel=1e-6)


def test_psnr_is_torchmetrics_with_per_image_mean_and_eps_floor():
    from torchmetrics.image import PeakSignalNoiseRatio

    psnr = PSNR()
    assert isinstance(psnr, PeakSignalNoiseRatio)
    # errors 0.25 and 0.1 on the [0, 1] scale (0.5 and 0.2 on [-1, 1]): 12.0412 dB and 20 dB
    a = torch.zeros(2, 3, 4, 4)
    b = torch.cat([torch.full((1, 3, 4, 4), 0.5), torch.full((1, 3, 4, 4), 0.2)])
    psnr.update(b, a)
    assert psnr.compute().item() == pytest.approx((-10 * math.log10(0.0625) + 20.0) / 2, rel=1e-6)
    glob = PSNR(reduction="global")
    glob.update(b, a)
    assert glob.compute().item() == pytest.approx(-10 * math.log10((0.0625 + 0.01) / 2), rel=1e-6)
    # identical images: the MSE floor eps gives -10·log10(eps) dB, not inf
    same = PSNR(eps=1e-8)
    same.update(a, a)
    assert same.compute().item() == pytest.approx(80.0)
    # values beyond [-1, 1] are clamped first (a reconstruction may overshoot)
    over = PSNR()
    over.update(torch.full((1, 3, 4, 4), 3.0), torch.ones(1, 3, 4, 4))
    assert over.compute().item() == pytest.approx(100.0)
    with pytest.raises(ValueError, match="per_image"):
        PSNR(reduction="mean")
