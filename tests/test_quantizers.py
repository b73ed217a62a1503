"""Quantizers: the contract for every registered one, and the numbers of ``vq`` / ``cvq``."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lgvq_plugins
from lgvq_plugins.backbones.cvq import ClusteredVectorQuantizer
from lgvq_plugins.backbones.quant_base import usage_stats
from lgvq_plugins.backbones.quant_search import nearest_codes, tile_shape
from lgvq_plugins.backbones.vq import VectorQuantizer
from lgvq_plugins.interfaces import Quantized, Quantizer

DIM = 16


def _latents(b: int = 2, dim: int = DIM, h: int = 4, w: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, dim, h, w, generator=torch.Generator().manual_seed(seed))


def check_contract(q: nn.Module, dim: int = DIM) -> None:
    """What every quantizer must satisfy (the generic checks)."""
    assert isinstance(q, Quantizer)
    assert q.dim == dim
    q.train()
    z = _latents(dim=dim).requires_grad_(True)
    out = q(z)
    assert isinstance(out, Quantized)
    assert out.z_q.shape == z.shape
    assert out.indices.shape == (z.shape[0], *z.shape[2:])
    assert out.indices.dtype == torch.int64
    assert 0 <= int(out.indices.min()) and int(out.indices.max()) < q.num_codes
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert torch.isfinite(out.z_q).all()
    for key in ("perplexity", "usage"):
        value = out.stats[key]
        assert not value.requires_grad and torch.isfinite(value)
    assert 1.0 <= float(out.stats["perplexity"]) <= q.num_codes + 1e-3
    assert 0.0 < float(out.stats["usage"]) <= 1.0

    # gradients reach the input (straight-through) and every learned parameter
    (out.z_q.square().sum() + out.loss).backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    for name, p in q.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"parameter {name} got no gradient"
            assert torch.isfinite(p.grad).all(), name

    codebook = q.codebook
    assert codebook.shape == (q.num_codes, dim)
    assert torch.isfinite(codebook).all()

    # eval: the output is exactly the looked-up codes
    q.eval()
    with torch.no_grad():
        out = q(z)
        assert torch.equal(out.z_q, q.embed(out.indices))


# ---------------------------------------------------------------------------------------
# Every registered quantizer (third-party ones included)
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", lgvq_plugins.list_quantizers())
def test_registered_quantizer_meets_contract(name: str) -> None:
    torch.manual_seed(0)
    check_contract(lgvq_plugins.create_quantizer(name, dim=DIM))


@pytest.mark.parametrize("name", lgvq_plugins.list_quantizers())
def test_registered_quantizer_config_rebuilds_it(name: str) -> None:
    q = lgvq_plugins.create_quantizer(name, dim=DIM)
    config = q.config
    assert json.loads(json.dumps(config)) == config  # JSON-serialisable
    rebuilt = lgvq_plugins.create_quantizer(name, **config)
    assert rebuilt.config == config
    assert type(rebuilt) is type(q)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in q.state_dict().items()}


def test_a_newly_registered_quantizer_is_checked_too() -> None:
    name = "tiny_sign_quantizer"

    @lgvq_plugins.register_quantizer(name)
    class SignQuantizer(nn.Module):  # 2**dim fixed codes (±1 per channel), straight-through
        def __init__(self, dim: int):
            super().__init__()
            self.dim, self.num_codes, self.config = dim, 2 ** dim, {"dim": dim}
            self.register_buffer("bits", 2 ** torch.arange(dim))

        codebook = property(lambda self: (torch.arange(self.num_codes)[:, None] // self.bits % 2) * 2.0 - 1)

        def embed(self, idx):
            return self.codebook[idx].movedim(-1, 1)

        def forward(self, z):
            idx = ((z > 0).long() * self.bits[:, None, None]).sum(1)
            q = self.embed(idx)
            stats = usage_stats(torch.bincount(idx.flatten(), minlength=self.num_codes))
            return Quantized(z + (q - z).detach() if self.training else q, idx, F.mse_loss(z, q), stats)

    try:
        assert name in lgvq_plugins.list_quantizers()
        check_contract(lgvq_plugins.create_quantizer(name, dim=6), dim=6)
    finally:
        lgvq_plugins.registry("quantizer").remove(name)
    assert name not in lgvq_plugins.list_quantizers()


# ---------------------------------------------------------------------------------------
# vq / cvq options
# ---------------------------------------------------------------------------------------

VQ_OPTIONS = [
    {},
    {"distance": "cosine"},
    {"legacy": True},
    {"ema": True},
    {"ema": True, "distance": "cosine"},
    {"code_dim": 4},
    {"code_dim": 4, "ema": True},
    {"chunk_size": 7},
]
CVQ_OPTIONS = [
    {},
    {"distance": "l2"},
    {"anchor": "closest"},
    {"anchor": "random"},
    {"anchor": None},
    {"contrastive": True},
    {"contrastive": True, "distance": "l2", "chunk_size": 50},
    {"first_batch": True, "legacy": True},
]


@pytest.mark.parametrize("options", VQ_OPTIONS, ids=lambda o: json.dumps(o))
def test_vq_options_meet_contract(options: dict) -> None:
    torch.manual_seed(0)
    q = lgvq_plugins.create_quantizer("vq", dim=DIM, num_codes=24, **options)
    check_contract(q)
    lgvq_plugins.create_quantizer("vq", **q.config)  # config round trip per option
    if options.get("ema"):
        assert "weight" not in dict(q.named_parameters())  # the codebook is not learned by gradient
    else:
        q.train()
        q.zero_grad()
        q(_latents()).loss.backward()
        assert q.weight.grad is not None and q.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("options", CVQ_OPTIONS, ids=lambda o: json.dumps(o))
def test_cvq_options_meet_contract(options: dict) -> None:
    torch.manual_seed(0)
    q = lgvq_plugins.create_quantizer("cvq", dim=DIM, num_codes=24, **options)
    check_contract(q)
    q.train()
    q.zero_grad()
    q(_latents()).loss.backward()
    assert q.weight.grad is not None and q.weight.grad.abs().sum() > 0


def test_bad_settings_raise_with_the_setting_named() -> None:
    with pytest.raises(ValueError, match="dim=16"):
        VectorQuantizer(dim=16)(torch.randn(1, 8, 2, 2))
    with pytest.raises(ValueError, match="distance"):
        VectorQuantizer(dim=4, distance="manhattan")
    with pytest.raises(ValueError, match="legacy"):
        VectorQuantizer(dim=4, ema=True, legacy=True)
    with pytest.raises(ValueError, match="anchor"):
        ClusteredVectorQuantizer(dim=4, anchor="nearest")


BAD_SETTINGS = [  # (quantizer, settings, the whole message: a changed word or bound fails)
    (VectorQuantizer, {"distance": "manhattan"}, "vq distance must be 'l2' or 'cosine', got 'manhattan'"),
    (VectorQuantizer, {"ema_decay": 1.0}, "vq ema_decay must be in [0, 1), got 1.0"),
    (VectorQuantizer, {"ema_decay": -0.1}, "vq ema_decay must be in [0, 1), got -0.1"),
    (VectorQuantizer, {"code_dim": 0}, "vq code_dim must be a positive width or None, got 0"),
    (VectorQuantizer, {"ema": True, "legacy": True},
     "vq: legacy=True only moves β between the codebook and commitment terms, and with ema=True there is no "
     "codebook term; set one of them to False"),
    (VectorQuantizer, {"num_codes": 1}, "num_codes must be at least 2, got 1"),
    (VectorQuantizer, {"chunk_size": 0}, "chunk_size (distance entries per tile) must be positive, got 0"),
    (ClusteredVectorQuantizer, {"distance": "dot"}, "cvq distance must be 'l2' or 'cosine', got 'dot'"),
    (ClusteredVectorQuantizer, {"anchor": "nearest"},
     "cvq anchor must be 'closest', 'random', 'probrandom' or None, got 'nearest'"),
    (ClusteredVectorQuantizer, {"usage_decay": 1.0}, "cvq usage_decay must be in (0, 1), got 1.0"),
    (ClusteredVectorQuantizer, {"usage_decay": 0.0}, "cvq usage_decay must be in (0, 1), got 0.0"),
    (ClusteredVectorQuantizer, {"contrastive_temperature": 0.0},
     "cvq contrastive_temperature must be positive, got 0.0"),
]


@pytest.mark.parametrize("cls,settings,message", BAD_SETTINGS, ids=lambda v: str(v)[:30])
def test_bad_settings_raise_with_the_exact_message(cls, settings: dict, message: str) -> None:
    with pytest.raises(ValueError) as info:
        cls(**{"dim": 4, **settings})
    assert str(info.value) == message
    with pytest.raises(ValueError, match="^dim must be a positive latent width, got 0$"):
        cls(dim=0)


def test_defaults_are_the_documented_reference_values() -> None:
    """taming's VQ (K 1024, β 0.25, EMA decay 0.99) and CVQ-VAE's (cosine, probrandom,
    usage decay 0.99, contrastive temperature 0.07); 2²² distance entries per tile."""
    assert VectorQuantizer(dim=4).config == {
        "dim": 4, "num_codes": 1024, "beta": 0.25, "distance": "l2", "legacy": False, "ema": False,
        "ema_decay": 0.99, "ema_eps": 1e-5, "code_dim": None, "chunk_size": 2**22}
    assert ClusteredVectorQuantizer(dim=4).config == {
        "dim": 4, "num_codes": 1024, "beta": 0.25, "distance": "cosine", "anchor": "probrandom",
        "usage_decay": 0.99, "contrastive": False, "contrastive_temperature": 0.07, "first_batch": False,
        "legacy": False, "chunk_size": 2**22, "seed": 0}


def test_search_rejects_mismatched_shapes_with_the_shapes_named() -> None:
    for x, codes in [(torch.randn(4, 3), torch.randn(5, 2)), (torch.randn(2, 3, 4), torch.randn(5, 3)),
                     (torch.randn(4, 3), torch.randn(3))]:
        with pytest.raises(ValueError) as info:
            nearest_codes(x, codes)
        assert str(info.value) == (f"nearest_codes expects x (N, C) and codes (K, C); got {tuple(x.shape)} "
                                   f"and {tuple(codes.shape)}")


def test_boundary_settings_are_accepted() -> None:
    VectorQuantizer(dim=1, num_codes=2, ema=True, ema_decay=0.0, code_dim=1, chunk_size=1)
    ClusteredVectorQuantizer(dim=1, num_codes=2, usage_decay=0.5, contrastive_temperature=1e-6, chunk_size=1)


# ---------------------------------------------------------------------------------------
# Nearest-code search
# ---------------------------------------------------------------------------------------


def _check_against_cdist(z: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor) -> None:
    rows = z.movedim(1, -1).reshape(-1, z.shape[1]).double()
    d = torch.cdist(rows, codebook.double()).square()  # (N, K) reference, float64
    ref = d.argmin(1)
    chosen = d.gather(1, indices.reshape(-1, 1)).squeeze(1)
    best = d.min(1).values
    assert torch.all(chosen <= best + 1e-4)  # never a worse code
    top2 = d.topk(2, dim=1, largest=False).values
    clear = (top2[:, 1] - top2[:, 0]) > 1e-3  # away from near-ties the index is the reference's
    assert clear.float().mean() > 0.95
    assert torch.equal(indices.reshape(-1)[clear], ref[clear])


@pytest.mark.parametrize("chunk_size", [None, 37, 300 * 5])
@pytest.mark.parametrize("autocast", [False, True])
def test_vq_picks_the_bruteforce_nearest_codes(chunk_size: int | None, autocast: bool) -> None:
    torch.manual_seed(1)
    q = lgvq_plugins.create_quantizer("vq", dim=8, num_codes=300, chunk_size=chunk_size)
    with torch.no_grad():
        q.weight.normal_()
    z = torch.randn(3, 8, 10, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = q(z)
    assert out.z_q.dtype == torch.float32  # quantized in fp32 even under autocast
    _check_against_cdist(z, q.weight.detach(), out.indices)
    reference = lgvq_plugins.create_quantizer("vq", dim=8, num_codes=300)
    reference.load_state_dict(q.state_dict())
    assert torch.equal(reference(z).indices, out.indices)  # chunking and autocast change nothing
    q.eval()
    assert torch.equal(q(q.embed(out.indices)).indices, out.indices)  # indices ↔ codes round trip


def test_search_tiles_respect_the_budget_and_agree() -> None:
    for n, k, budget in [(1000, 300, 37), (1000, 300, 4096), (5, 70000, 2**22), (16384, 65536, 2**22),
                         (1, 300, 300), (1000, 300, 1), (7, 5, 3)]:
        rows, cols = tile_shape(n, k, budget)
        assert 1 <= rows <= n and 1 <= cols <= k, (n, k, budget)
        assert rows * cols <= budget, (n, k, budget)  # one tile never exceeds the budget
    assert tile_shape(1000, 300, 300 * 1000) == (1000, 300)  # all of it in one tile when allowed
    assert tile_shape(4096, 300, 300 * 256) == (256, 300)  # row blocks of all codes ...
    assert tile_shape(4096, 70000, 2**22) == (256, 16384)  # ... until K is too large for that
    with pytest.raises(ValueError, match="chunk_size must be a positive number of distance entries, got 0"):
        tile_shape(10, 10, 0)
    plain = nearest_codes(torch.randn(9, 5), torch.randn(4, 5))
    assert plain.code_score is None and plain.code_arg is None  # no per-code reduction asked
    x, codes = torch.randn(257, 5), torch.randn(61, 5)
    full = nearest_codes(x, codes, chunk_size=10**9, per_code="closest")
    # 64: one code per tile; 600: 256 rows × 2 codes with an uneven last tile; 256·61: all
    # codes, 256 + 1 rows (a budget of 1 is covered by the tie test below)
    for budget in (64, 600, 256 * 61):
        part = nearest_codes(x, codes, chunk_size=budget, per_code="closest")
        assert torch.equal(part.indices, full.indices)
        assert torch.equal(part.code_arg, full.code_arg)
        torch.testing.assert_close(part.distances, full.distances)
    d = torch.cdist(x.double(), codes.double()).square()
    torch.testing.assert_close(full.distances.double(), d.min(1).values, atol=1e-4, rtol=1e-5)
    assert torch.equal(full.code_arg, d.argmin(0))  # per-code closest vector


def test_vq_never_holds_more_than_one_tile_of_distances(monkeypatch: pytest.MonkeyPatch) -> None:
    shapes: list[tuple[int, ...]] = []
    real_addmm = torch.addmm

    def recording_addmm(*args, **kwargs):
        result = real_addmm(*args, **kwargs)
        shapes.append(tuple(result.shape))
        return result

    monkeypatch.setattr(torch, "addmm", recording_addmm)
    q = VectorQuantizer(dim=8, num_codes=300, chunk_size=1000)
    q(torch.randn(2, 8, 16, 16))  # N = 512 vectors: the full matrix would be 153,600 entries
    assert shapes and max(r * c for r, c in shapes) <= 1000
    assert sum(r * c for r, c in shapes) == 512 * 300  # every distance computed exactly once


def test_default_tile_is_the_documented_16_mib(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default budget is 2²² distance entries (16 MiB in fp32): tiles use all of it when
    the matrix is larger, and never more."""
    shapes: list[tuple[int, ...]] = []
    real_addmm = torch.addmm

    def recording_addmm(*args, **kwargs):
        result = real_addmm(*args, **kwargs)
        shapes.append(tuple(result.shape))
        return result

    monkeypatch.setattr(torch, "addmm", recording_addmm)
    VectorQuantizer(dim=2, num_codes=2048)(torch.randn(1, 2, 64, 64))  # 4096 × 2048 = 2²³ entries
    assert shapes == [(2048, 2048), (2048, 2048)]


def test_per_code_sampling_follows_the_softmax() -> None:
    # 4000 identical codes (each draws on its own Gumbel noise), four vectors at squared
    # distances 0, 1, 2, 3: P(n) ∝ exp(-scale·d_n); chunk 2000 spreads the codes over 8 tiles
    codes = torch.zeros(4000, 1)
    x = torch.tensor([[0.0], [1.0], [2.0 ** 0.5], [3.0 ** 0.5]])
    scale = 0.7
    gen = torch.Generator().manual_seed(0)
    draws = nearest_codes(x, codes, chunk_size=2000, per_code="sample", logit_scale=scale, generator=gen).code_arg
    freq = torch.bincount(draws, minlength=4).double() / draws.numel()
    expected = torch.softmax(-scale * torch.arange(4.0, dtype=torch.float64), 0)
    torch.testing.assert_close(freq, expected, atol=0.025, rtol=0)
    # the default temperature is 1, and inputs that require grad are fine (no autograd inside)
    draws = nearest_codes(x.requires_grad_(True), codes, per_code="sample", generator=gen).code_arg
    freq = torch.bincount(draws, minlength=4).double() / draws.numel()
    expected = torch.softmax(-torch.arange(4.0, dtype=torch.float64), 0)
    torch.testing.assert_close(freq, expected, atol=0.025, rtol=0)


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 10**6])
def test_search_takes_the_first_index_on_exact_ties(chunk_size: int) -> None:
    """The documented tie rule, with exact fp32 ties inside and across tiles: the lowest code
    index for every vector, and the lowest vector index for every code (``closest``)."""
    codes = torch.tensor([[5.0, 5.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    # rows 0, 2, 5 are copies, as are 1 and 3; row 4 is equidistant from codes 1-4 (0.5 each)
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [1.0, 0.0], [0.0, 0.0]])
    found = nearest_codes(x, codes, chunk_size=chunk_size, per_code="closest")
    assert found.indices.tolist() == [1, 2, 1, 2, 1, 1, 1]
    assert found.distances.tolist() == [0.0, 0.0, 0.0, 0.0, 0.5, 0.0, 1.0]
    # code 0 = (5, 5): row 4 at 40.5 beats rows 0-3 and 5 at 41; codes 3, 4 copy codes 1, 2
    assert found.code_arg.tolist() == [4, 0, 1, 0, 1]
    assert found.code_score.tolist() == [-40.5, 0.0, 0.0, 0.0, 0.0]


# ---------------------------------------------------------------------------------------
# Losses, EMA and statistics
# ---------------------------------------------------------------------------------------


def _one_row_input(*points: tuple[float, float]) -> torch.Tensor:
    """(1, 2, 1, n) latents whose rows are ``points``."""
    return torch.tensor(points, dtype=torch.float32).T.reshape(1, 2, 1, len(points))


def test_ema_update_matches_hand_computation() -> None:
    q = VectorQuantizer(dim=2, num_codes=2, ema=True, ema_decay=0.5, ema_eps=0.0, beta=0.25)
    with torch.no_grad():
        q.weight.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0]]))
        q.embed_sum.copy_(q.weight)
    out = q(_one_row_input((1, 0), (0, 1), (9, 9)))
    assert out.indices.tolist() == [[[0, 0, 1]]]
    # commitment only: β · mean((x − q)²) = 0.25 · (1 + 1 + 2)/6
    assert out.loss.item() == pytest.approx(0.25 * 4 / 6)
    # cluster sizes 0.5·[1, 1] + 0.5·[2, 1]; sums 0.5·codes + 0.5·[[1, 1], [9, 9]]
    torch.testing.assert_close(q.cluster_size, torch.tensor([1.5, 1.0]))
    torch.testing.assert_close(q.embed_sum, torch.tensor([[0.5, 0.5], [9.5, 9.5]]))
    torch.testing.assert_close(q.weight, torch.tensor([[1 / 3, 1 / 3], [9.5, 9.5]]))
    # a second step: code 1 unused, cluster size 0.5, sums 0.5·[9.5, 9.5] → it stays at 9.5
    q(_one_row_input((1, 1), (1, 1)))
    torch.testing.assert_close(q.cluster_size, torch.tensor([1.75, 0.5]))
    torch.testing.assert_close(q.weight, torch.tensor([[(0.25 + 1) / 1.75] * 2, [9.5, 9.5]]))

    # Laplace smoothing: (c + ε)/(n + Kε)·n
    q = VectorQuantizer(dim=2, num_codes=2, ema=True, ema_decay=0.5, ema_eps=0.1)
    with torch.no_grad():
        q.weight.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0]]))
        q.embed_sum.copy_(q.weight)
    q(_one_row_input((1, 0), (0, 1), (9, 9)))
    smoothed = (torch.tensor([1.5, 1.0]) + 0.1) / (2.5 + 0.2) * 2.5
    torch.testing.assert_close(q.weight, torch.tensor([[0.5, 0.5], [9.5, 9.5]]) / smoothed[:, None])
    # eval mode leaves the EMA state alone
    q.eval()
    before = q.weight.clone()
    q(_one_row_input((5, 5)))
    assert torch.equal(q.weight, before)


def test_ema_decay_weighs_the_old_average() -> None:
    """decay 0.8 (not 0.5, where ``decay`` and ``1 − decay`` coincide): the old averages keep
    weight 0.8 and the batch gets 0.2."""
    q = VectorQuantizer(dim=2, num_codes=2, ema=True, ema_decay=0.8, ema_eps=0.0)
    with torch.no_grad():
        q.weight.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0]]))
        q.embed_sum.copy_(q.weight)
    q(_one_row_input((1, 0), (0, 1), (9, 9)))  # counts [2, 1], sums [[1, 1], [9, 9]]
    torch.testing.assert_close(q.cluster_size, torch.tensor([0.8 + 0.2 * 2, 0.8 + 0.2 * 1]))
    torch.testing.assert_close(q.embed_sum, torch.tensor([[0.2, 0.2], [9.8, 9.8]]))
    torch.testing.assert_close(q.weight, torch.tensor([[0.2 / 1.2, 0.2 / 1.2], [9.8, 9.8]]))


@pytest.mark.parametrize("legacy", [False, True])
def test_beta_weighs_commitment_unless_legacy(legacy: bool) -> None:
    q = VectorQuantizer(dim=2, num_codes=2, beta=0.25, legacy=legacy)
    with torch.no_grad():
        q.weight.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0]]))
    z = _one_row_input((1, 0), (0, 2)).requires_grad_(True)
    out = q(z)
    out.loss.backward()
    n = 4  # elements
    codebook_w, commit_w = (0.25, 1.0) if legacy else (1.0, 0.25)
    # d/dq of w·mean((q − x)²) = 2w(q − x)/n, summed over the rows assigned to code 0
    torch.testing.assert_close(q.weight.grad[0], codebook_w * 2 * torch.tensor([-1.0, -2.0]) / n)
    torch.testing.assert_close(z.grad.reshape(2, 2).T, commit_w * 2 * torch.tensor([[1.0, 0.0], [0.0, 2.0]]) / n)
    assert out.loss.item() == pytest.approx((1 + 0.25) * 5 / 4)


def test_straight_through_gradient_is_identity() -> None:
    q = VectorQuantizer(dim=DIM, num_codes=8)
    z = _latents().requires_grad_(True)
    g = torch.randn_like(z)
    (q(z).z_q * g).sum().backward()
    torch.testing.assert_close(z.grad, g)


def test_perplexity_usage_and_histogram_by_hand() -> None:
    q = VectorQuantizer(dim=2, num_codes=4)
    with torch.no_grad():
        q.weight.copy_(torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0], [5.0, 5.0]]))
    out = q(_one_row_input((0.1, 0), (0, 0.2), (4.8, 0.1), (0.3, 5.1)))
    assert out.indices.reshape(-1).tolist() == [0, 0, 1, 2]
    # frequencies ½, ¼, ¼, 0: entropy 1.5·ln 2, perplexity 2^1.5
    assert out.stats["perplexity"].item() == pytest.approx(2 ** 1.5, rel=1e-5)
    assert out.stats["usage"].item() == pytest.approx(0.75)
    q.eval()
    q(_one_row_input((5, 5)))
    assert q.usage_histogram.tolist() == [2, 1, 1, 1]
    assert q.usage_fraction() == 1.0
    q.reset_usage()
    assert q.usage_fraction() == 0.0 and q.usage_histogram.sum() == 0


def test_factorised_codes_are_unit_vectors_in_low_dim() -> None:
    q = VectorQuantizer(dim=DIM, num_codes=32, code_dim=4)
    assert q.lookup_codebook.shape == (32, 4)
    torch.testing.assert_close(q.lookup_codebook.norm(dim=1), torch.ones(32))
    out = q(_latents())
    out.loss.backward()
    assert q.project_in.weight.grad.abs().sum() > 0 and q.weight.grad.abs().sum() > 0
    q.eval()
    torch.testing.assert_close(q.codebook, q.project_out(q.lookup_codebook))


# ---------------------------------------------------------------------------------------
# CVQ
# ---------------------------------------------------------------------------------------


def _clustered_data(seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(6, DIM, generator=gen)
    pts = centres[torch.randint(6, (256,), generator=gen)] + 0.05 * torch.randn(256, DIM, generator=gen)
    return pts.T.reshape(1, DIM, 16, 16)


@pytest.mark.parametrize("anchor,distance", [("closest", "l2"), ("random", "l2"), ("probrandom", "l2"),
                                             ("probrandom", "cosine"), ("closest", "cosine")])
def test_cvq_moves_dead_codes_to_the_data(anchor: str, distance: str) -> None:
    torch.manual_seed(0)
    z = _clustered_data()
    data = z.movedim(1, -1).reshape(-1, DIM)
    q = ClusteredVectorQuantizer(dim=DIM, num_codes=16, anchor=anchor, distance=distance)
    with torch.no_grad():
        q.weight.copy_(data[:16])
        q.weight[8:] = -data[:8] * 40 if distance == "cosine" else 40.0  # unreachable codes
    dead_before = q.weight[8:].clone()
    q.eval()
    assert q(z).indices.unique().max() < 8  # no feature is nearest to the dead codes
    q.train()
    q(z)
    moved = q.weight[8:].detach()
    gap = torch.cdist(moved, data).min(1).values
    assert (moved - dead_before).norm(dim=1).min() > 1.0
    # unused (p_k = 0) codes are pulled with weight exp(-1e-3): they now sit on a feature
    assert gap.max() < 0.05 * data.norm(dim=1).mean()
    for _ in range(3):
        q(z)
    assert torch.isfinite(q.weight).all()
    q.eval()
    assert q(z).indices.unique().numel() > 8  # the revived codes are used


def test_cvq_reanchoring_matches_the_formula() -> None:
    q = ClusteredVectorQuantizer(dim=2, num_codes=2, distance="l2", anchor="closest")
    with torch.no_grad():
        q.weight.copy_(torch.tensor([[0.0, 0.0], [50.0, 50.0]]))
    out = q(_one_row_input((1, 0), (0, 2), (0, 0.5)))
    assert out.indices.reshape(-1).tolist() == [0, 0, 0]
    torch.testing.assert_close(q.usage_ema, torch.tensor([0.01, 0.0]))
    w = torch.exp(-torch.tensor([0.01, 0.0]) * 2 * 10 / 0.01 - 1e-3)
    expected = torch.stack([w[0] * torch.tensor([0.0, 0.5]),  # closest feature to (0, 0)
                            (1 - w[1]) * torch.tensor([50.0, 50.0]) + w[1] * torch.tensor([0.0, 2.0])])
    torch.testing.assert_close(q.weight.detach(), expected)
    # eval mode: no statistics, no re-anchoring
    q.eval()
    before = q.weight.clone()
    q(_one_row_input((7, 7)))
    assert torch.equal(q.weight, before)


def _probrandom_anchor_frequencies(distance: str, feats: torch.Tensor, code: torch.Tensor,
                                   num_codes: int = 3001, seed: int = 0) -> torch.Tensor:
    """Frequencies of the features drawn as anchors by ``num_codes − 1`` identical dead codes.

    All codes start at ``code`` and all features pick code 0 (first on ties), so codes
    1..K−1 are unused (p_k = 0, pull w = exp(−1e-3)) and each draws its anchor independently;
    the anchor is read back from ``e' = (1 − w)·e + w·anchor``.
    """
    n, dim = feats.shape
    q = ClusteredVectorQuantizer(dim=dim, num_codes=num_codes, distance=distance, anchor="probrandom", seed=seed)
    with torch.no_grad():
        q.weight.copy_(code.expand(num_codes, dim))
    q(feats.T.reshape(1, dim, 1, n))
    w = math.exp(-1e-3)
    anchors = (q.weight.detach()[1:] - (1 - w) * code) / w
    gap, which = torch.cdist(anchors.double(), feats.double()).min(1)
    assert gap.max() < 1e-4  # every anchor is one of the features
    return torch.bincount(which, minlength=n).double() / which.numel()


@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_cvq_probrandom_draws_anchors_with_the_documented_temperature(distance: str) -> None:
    """P(anchor_k = x_n) = softmax_n(sim(x_n, e_k)): sim = −‖x − e‖² for l2, the cosine
    (temperature 1) for cosine."""
    if distance == "l2":
        feats = torch.tensor([[0.0], [1.0], [2.0 ** 0.5], [3.0 ** 0.5]])  # squared distances 0..3
        code = torch.zeros(1)
        sim = -torch.arange(4.0, dtype=torch.float64)
    else:
        angles = torch.tensor([0.0, 60.0, 90.0, 180.0], dtype=torch.float64).deg2rad()
        feats = torch.stack([angles.cos(), angles.sin()], 1).float()  # cosines 1, ½, 0, −1
        code = torch.tensor([3.0, 0.0])  # only the direction matters
        sim = angles.cos()
    freq = _probrandom_anchor_frequencies(distance, feats, code)
    # 3000 draws: the standard error of each frequency is below 0.01
    torch.testing.assert_close(freq, torch.softmax(sim, 0), atol=0.03, rtol=0)
    # ... and the draws are reproducible from the quantizer's seed, and change with it
    assert torch.equal(freq, _probrandom_anchor_frequencies(distance, feats, code))
    assert not torch.equal(freq, _probrandom_anchor_frequencies(distance, feats, code, seed=1))


def test_cvq_first_batch_anchors_once() -> None:
    q = ClusteredVectorQuantizer(dim=DIM, num_codes=16, anchor="random", first_batch=True)
    z = _clustered_data()
    q(z)
    after_first = q.weight.detach().clone()
    assert bool(q.anchored)
    q(z)
    torch.testing.assert_close(q.weight.detach(), after_first)


def test_cvq_contrastive_term_matches_a_full_sort() -> None:
    torch.manual_seed(0)
    q = ClusteredVectorQuantizer(dim=4, num_codes=5, distance="cosine", contrastive=True, chunk_size=40)
    x = torch.randn(20, 4)
    weight = q.weight.detach().clone().requires_grad_(True)
    value = q._contrastive(x, weight)
    value.backward()
    # reference: similarities sorted along the features, as in CVQ-VAE
    w = weight.detach().clone().requires_grad_(True)
    d = F.normalize(x, dim=1) @ F.normalize(w, dim=1).T  # (N, K)
    s = d.sort(dim=0).values
    pos = s[-max(1, 20 // 5):].mean(0, keepdim=True)
    neg = s[: 20 // 2]
    logits = torch.cat([pos, neg], 0).T / 0.07
    ref = F.cross_entropy(logits, torch.zeros(5, dtype=torch.long))
    ref.backward()
    torch.testing.assert_close(value, ref)
    torch.testing.assert_close(weight.grad, w.grad)


def test_quantizers_are_fp32_under_autocast() -> None:
    z = _latents()
    for q in (VectorQuantizer(dim=DIM, num_codes=32, code_dim=4), ClusteredVectorQuantizer(dim=DIM, num_codes=32)):
        q.eval()
        ref = q(z)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = q(z.bfloat16())
        assert out.z_q.dtype == torch.float32 and out.loss.dtype == torch.float32
        # the bf16 input rounds the latents, but the code math itself stays fp32
        agree = (out.indices == ref.indices).float().mean()
        assert agree > 0.9
        assert torch.equal(out.z_q, q.embed(out.indices))


def test_usage_stat_is_global_sum_of_counts() -> None:
    # single process: the collective is a no-op, the stats come from the local counts
    q = VectorQuantizer(dim=DIM, num_codes=64)
    out = q(_latents())
    counts = torch.bincount(out.indices.reshape(-1), minlength=64)
    assert out.stats["usage"].item() == pytest.approx((counts > 0).float().mean().item())
    p = counts.double() / counts.sum()
    assert out.stats["perplexity"].item() == pytest.approx(math.exp(-(p[p > 0] * p[p > 0].log()).sum().item()), rel=1e-5)


def test_config_records_gin_bindings() -> None:
    import gin

    gin.parse_config(["vq.num_codes = 12", "vq.distance = 'cosine'", "cvq.anchor = 'closest'"])
    q = lgvq_plugins.create_quantizer("vq", dim=DIM)
    assert q.num_codes == 12 and q.config["num_codes"] == 12 and q.config["distance"] == "cosine"
    assert lgvq_plugins.create_quantizer("cvq", dim=DIM).config["anchor"] == "closest"
    gin.clear_config()
    rebuilt = lgvq_plugins.create_quantizer("vq", **q.config)  # no gin needed any more
    assert rebuilt.config == q.config and rebuilt.weight.shape == (12, DIM)
