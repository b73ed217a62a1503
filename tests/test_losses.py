"""The alignment losses gsa / mtp / ras against hand-computed tiny cases, and the masking rule."""

from __future__ import annotations

import math
import types

import pytest
import torch
import torch.nn.functional as F
from fakes import FakeTextEncoder
from torch import nn

from lgvq_plugins.guidance.losses import (
    GlobalSemanticAlignment,
    MaskedTextPrediction,
    RelationshipAlignment,
    info_nce,
    ras_strength_factor,
    relationship_alignment,
)
from lgvq_plugins.guidance.masking import (
    MaskingRule,
    eligible_tokens,
    mask_k_per_caption,
    sample_mlm_mask,
)
from lgvq_plugins.interfaces import GuidedOutput, Quantized, TextFeatures, TextTokens


def _cos(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def _guided(text: TextFeatures, visual: torch.Tensor, z_q: torch.Tensor | None = None) -> GuidedOutput:
    b = visual.shape[0]
    z_q = torch.zeros(b, 4, 1, visual.shape[1] - 1) if z_q is None else z_q
    quantized = Quantized(z_q, torch.zeros(b, 1, z_q.shape[-1], dtype=torch.long), torch.zeros(()))
    return GuidedOutput(torch.zeros(b, 3, 4, 4), quantized, text=text, visual_tokens=visual)


def _guide(encoder, visual_width: int | None = None, code_dim: int = 4):
    return types.SimpleNamespace(text_encoder=encoder, visual_width=visual_width or encoder.width,
                                 code_dim=code_dim)


def _tokens(ids: list[list[int]], lengths: list[int], special: list[list[bool]]) -> TextTokens:
    return TextTokens(torch.tensor(ids), torch.tensor(lengths), torch.tensor(special))


# ---------------------------------------------------------------------------------------
# L_gsa
# ---------------------------------------------------------------------------------------

GSA_V = [[1.0, 0.0], [0.0, 2.0]]
GSA_G = [[1.0, 1.0], [0.0, -1.0]]


def _gsa_by_hand(temperature: float, symmetric: bool) -> float:
    s = [[_cos(v, g) / temperature for g in GSA_G] for v in GSA_V]
    i2t = [-(s[i][i] - math.log(sum(math.exp(x) for x in s[i]))) for i in range(2)]
    loss = sum(i2t) / 2
    if symmetric:
        t2i = [-(s[j][j] - math.log(sum(math.exp(s[i][j]) for i in range(2)))) for j in range(2)]
        loss = 0.5 * (loss + sum(t2i) / 2)
    return loss


@pytest.mark.parametrize("temperature", [1.0, 0.5])
@pytest.mark.parametrize("symmetric", [False, True])
def test_gsa_hand_computed(temperature, symmetric):
    loss = info_nce(torch.tensor(GSA_V), torch.tensor(GSA_G), temperature=temperature, symmetric=symmetric)
    assert loss.item() == pytest.approx(_gsa_by_hand(temperature, symmetric), rel=1e-6)


def test_gsa_matches_the_reference_formula():
    """The reference's L_gsa, transcribed (``global_infor_sup``):
        v = v / ‖v‖;  g = g / ‖g‖ (detached)
        pos_i = v_i · g_i;  neg_i = Σ_j exp(v_i · g_j)
        loss = mean_i −log(exp(pos_i) / (neg_i + 1e-6))"""
    torch.manual_seed(1)
    v, g = torch.randn(6, 9, dtype=torch.float64), torch.randn(6, 9, dtype=torch.float64)
    vn, gn = v / v.norm(dim=-1, keepdim=True), g / g.norm(dim=-1, keepdim=True)
    pos = (vn * gn).sum(-1)
    neg = torch.exp(vn @ gn.T).sum(-1)
    reference = (-torch.log(torch.exp(pos) / (neg + 1e-6))).mean()
    assert info_nce(v, g).item() == pytest.approx(reference.item(), rel=2e-6)


def test_gsa_equals_cross_entropy_on_cosine_matrix_and_detaches_text():
    torch.manual_seed(0)
    v = torch.randn(5, 7, requires_grad=True)
    g = torch.randn(5, 7, requires_grad=True)
    loss = info_nce(v, g, temperature=0.1)
    cos = F.cosine_similarity(v[:, None], g[None], dim=-1)
    assert loss.item() == pytest.approx(F.cross_entropy(cos / 0.1, torch.arange(5)).item(), rel=1e-5)
    loss.backward()
    assert g.grad is None and v.grad is not None and v.grad.abs().sum() > 0


def test_gsa_module_projects_when_widths_differ():
    encoder = FakeTextEncoder(width=32, global_width=24)
    gsa = GlobalSemanticAlignment(temperature=1.0)
    gsa.setup(_guide(encoder))
    assert isinstance(gsa.proj, nn.Linear) and (gsa.proj.in_features, gsa.proj.out_features) == (32, 24)
    same = GlobalSemanticAlignment()
    same.setup(_guide(FakeTextEncoder(width=24, global_width=24)))
    assert isinstance(same.proj, nn.Identity)

    text = encoder.encode(encoder.tokenize(["a b", "c d e"]))
    visual = torch.randn(2, 5, 32)
    expected = info_nce(gsa.proj(visual[:, 0]), text.global_feat)
    assert gsa(_guided(text, visual), {}).item() == pytest.approx(expected.item())
    with pytest.raises(ValueError, match="temperature"):
        GlobalSemanticAlignment(temperature=0)


def test_loss_before_setup_says_so():
    with pytest.raises(RuntimeError, match="setup"):
        GlobalSemanticAlignment()(_guided(None, torch.zeros(1, 2, 4)), {})


# ---------------------------------------------------------------------------------------
# Masking rule
# ---------------------------------------------------------------------------------------

# two captions: [CLS] w w w [SEP] pad pad / [CLS] w [SEP] pad pad pad pad. The padding ids
# are 0 *and* a real word id (7) to show padding is found by length, not by id.
MASK_TOKENS = _tokens([[1, 5, 6, 7, 2, 0, 7], [1, 9, 2, 7, 7, 0, 0]], [5, 3],
                      [[True, False, False, False, True, False, False],
                       [True, False, True, False, False, False, False]])


def test_eligible_excludes_special_and_padding():
    expected = torch.tensor([[False, True, True, True, False, False, False],
                             [False, True, False, False, False, False, False]])
    assert torch.equal(eligible_tokens(MASK_TOKENS), expected)


def test_masks_never_touch_special_or_padding():
    eligible = eligible_tokens(MASK_TOKENS)
    everything = MaskingRule(mean=1.0, std=0.0, low=1.0, high=1.0)
    mask, ratio = sample_mlm_mask(MASK_TOKENS, everything)
    assert ratio == 1.0 and torch.equal(mask, eligible)  # ratio 1 masks exactly the eligible ones
    torch.manual_seed(0)
    for _ in range(200):
        mask, _ = sample_mlm_mask(MASK_TOKENS)
        assert not (mask & ~eligible).any()


def _truncnorm_mean(mu: float, sigma: float, low: float, high: float) -> float:
    """Mean of N(mu, sigma²) conditioned on [low, high] (closed form)."""
    pdf = lambda x: math.exp(-x * x / 2) / math.sqrt(2 * math.pi)
    cdf = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))
    a, b = (low - mu) / sigma, (high - mu) / sigma
    return mu + sigma * (pdf(a) - pdf(b)) / (cdf(b) - cdf(a))


def test_mask_ratio_is_the_reference_truncated_normal():
    """The reference draws the ratio once per batch as (transcribed)
        mu, sigma = 0.5, 0.1; lower, upper = 0.1, 0.3
        X = scipy.stats.truncnorm((lower - mu) / sigma, (upper - mu) / sigma, loc=mu, scale=sigma).rvs(1)[0]
    i.e. a normal *conditioned* on [0.1, 0.3] (mean ≈ 0.263), not one clipped to it (≈ 0.299)."""
    expected_mean = _truncnorm_mean(0.5, 0.1, 0.1, 0.3)
    assert expected_mean == pytest.approx(0.2630, abs=1e-4)
    gen = torch.Generator().manual_seed(0)
    ratios = torch.tensor([MaskingRule().sample_ratio(gen) for _ in range(4000)], dtype=torch.float64)
    assert ratios.min() >= 0.1 and ratios.max() <= 0.3
    assert ratios.mean().item() == pytest.approx(expected_mean, abs=0.002)  # standard error ≈ 0.0005
    # a clipped normal puts ~98 % of its draws at 0.3; the truncated one only ~2 % above 0.299
    assert (ratios >= 0.299).double().mean().item() < 0.05
    assert (ratios < 0.2).double().mean().item() == pytest.approx(0.056, abs=0.015)
    stats = pytest.importorskip("scipy.stats")
    reference = stats.truncnorm((0.1 - 0.5) / 0.1, (0.3 - 0.5) / 0.1, loc=0.5, scale=0.1)
    assert stats.kstest(ratios.numpy(), reference.cdf).pvalue > 0.01
    # far from the bounds the truncation does nothing: N(0.5, 0.1) itself
    wide = torch.tensor([MaskingRule(low=0.0, high=1.0).sample_ratio(gen) for _ in range(2000)])
    assert wide.mean().item() == pytest.approx(0.5, abs=0.01)
    assert wide.std().item() == pytest.approx(0.1, abs=0.01)
    assert MaskingRule(mean=0.5, std=0.0).sample_ratio() == 0.3  # degenerate: the mean, kept in bounds


def test_mask_ratio_draws_follow_the_seed():
    first = [MaskingRule().sample_ratio(torch.Generator().manual_seed(5)) for _ in range(3)]
    assert len(set(first)) == 1
    torch.manual_seed(5)
    a = [MaskingRule().sample_ratio() for _ in range(3)]
    torch.manual_seed(5)
    assert a == [MaskingRule().sample_ratio() for _ in range(3)] and len(set(a)) == 3


def test_each_eligible_token_masked_with_the_ratio():
    b, length = 200, 40
    tokens = TextTokens(torch.full((b, length), 5), torch.full((b,), length), torch.zeros(b, length, dtype=torch.bool))
    torch.manual_seed(1)
    mask, ratio = sample_mlm_mask(tokens, MaskingRule(mean=0.2, std=0.0, low=0.0, high=1.0))
    assert ratio == pytest.approx(0.2)
    assert mask.float().mean().item() == pytest.approx(0.2, abs=0.01)


def test_at_least_one_token_is_masked():
    never = MaskingRule(mean=0.0, std=0.0, low=0.0, high=0.0)
    torch.manual_seed(0)
    for _ in range(20):
        mask, _ = sample_mlm_mask(MASK_TOKENS, never)
        assert mask.sum() == 1 and (mask & eligible_tokens(MASK_TOKENS)).sum() == 1
    nothing_eligible = _tokens([[1, 2, 0]], [2], [[True, True, False]])
    assert not sample_mlm_mask(nothing_eligible, never)[0].any()
    # the reference has no such rule: a batch may mask nothing
    reference = MaskingRule(mean=0.0, std=0.0, low=0.0, high=0.0, min_one=False)
    assert not sample_mlm_mask(MASK_TOKENS, reference)[0].any()


def test_masks_are_reproducible():
    torch.manual_seed(3)
    first = [sample_mlm_mask(MASK_TOKENS)[0] for _ in range(5)]
    torch.manual_seed(3)
    second = [sample_mlm_mask(MASK_TOKENS)[0] for _ in range(5)]
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    gen_a, gen_b = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert all(torch.equal(sample_mlm_mask(MASK_TOKENS, generator=gen_a)[0],
                           sample_mlm_mask(MASK_TOKENS, generator=gen_b)[0]) for _ in range(5))


def test_mask_k_per_caption():
    torch.manual_seed(0)
    mask = mask_k_per_caption(MASK_TOKENS, 2)
    assert mask.sum(1).tolist() == [2, 1]  # the second caption has one eligible word
    assert not (mask & ~eligible_tokens(MASK_TOKENS)).any()
    with pytest.raises(ValueError):
        mask_k_per_caption(MASK_TOKENS, 0)


# ---------------------------------------------------------------------------------------
# L_mtp
# ---------------------------------------------------------------------------------------


def _mtp_case(seed: int = 4):
    torch.manual_seed(0)
    encoder = FakeTextEncoder(vocab_size=20, max_length=7, width=16, global_width=16, embed_width=8)
    mtp = MaskedTextPrediction(heads=4, seed=seed, mask_ratio_low=0.5, mask_ratio_high=0.5)
    mtp.setup(_guide(encoder))
    text = TextFeatures(torch.randn(2, 7, 16), torch.randn(2, 16), MASK_TOKENS)
    visual = torch.randn(2, 5, 16)
    return encoder, mtp, text, visual


def test_mtp_hand_computed_label_smoothed_mean_over_masked():
    encoder, mtp, text, visual = _mtp_case()
    guided = _guided(text, visual)
    loss = mtp(guided, {})
    out = guided.extras["mtp"]
    expected_mask, _ = sample_mlm_mask(MASK_TOKENS, mtp.rule, torch.Generator().manual_seed(4))
    assert torch.equal(out["mask"], expected_mask)
    assert out["targets"].tolist() == MASK_TOKENS.ids[expected_mask].tolist()
    eps, v = 0.1, encoder.vocab_size
    terms = []
    for row, target in zip(out["logits"].tolist(), out["targets"].tolist()):
        log_z = math.log(sum(math.exp(x) for x in row))
        log_p = [x - log_z for x in row]
        terms.append(-(1 - eps) * log_p[target] - eps / v * sum(log_p))
    assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def test_mtp_matches_the_reference_formula():
    """The reference's L_mtp, transcribed (``LabelSmoothingCrossEntropy`` + ``crossEntropy``):
        logp = log_softmax(logits);  nll = −logp[target];  smooth = −mean_v logp
        per_token = 0.9 · nll + 0.1 · smooth
        loss = Σ per_token · mask / (Σ mask + 5e-6)     # mask: hidden, real tokens"""
    _, mtp, text, visual = _mtp_case()
    guided = _guided(text, visual)
    loss = mtp(guided, {})
    out = guided.extras["mtp"]
    logp = torch.log_softmax(out["logits"].double(), dim=-1)
    per_token = 0.9 * -logp.gather(1, out["targets"][:, None])[:, 0] + 0.1 * -logp.mean(-1)
    n_masked = out["mask"].sum()
    reference = per_token.sum() / (n_masked + 5e-6)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)


def test_mtp_without_a_masked_token_is_zero_like_the_reference():
    _, mtp, text, visual = _mtp_case()
    mtp.rule = MaskingRule(mean=0.0, std=0.0, low=0.0, high=0.0, min_one=False)
    loss = mtp(_guided(text, visual), {})
    assert loss.item() == 0.0 and loss.requires_grad


def test_mtp_logits_tied_to_frozen_embeddings():
    encoder, mtp, text, visual = _mtp_case()
    mask, _ = sample_mlm_mask(MASK_TOKENS, mtp.rule, torch.Generator().manual_seed(4))
    states = mtp.decoder(text.token_feats, mask, MASK_TOKENS.padding_mask, visual)[mask]
    head = mtp.head
    h = F.layer_norm(F.gelu(states @ head.dense.weight.T + head.dense.bias), (8,),
                     head.norm.weight, head.norm.bias, eps=head.norm.eps)
    expected = h @ encoder.vocab_embeddings.T + head.bias
    assert torch.allclose(mtp.predict(visual, text, mask), expected, atol=1e-5)
    assert head.norm.eps >= 1e-5
    assert all(p is not encoder.vocab_embeddings for p in mtp.parameters())


def test_mtp_ignores_unmasked_and_padded_positions():
    _, mtp, text, visual = _mtp_case()
    base = mtp(_guided(text, visual), {}).item()
    mask = sample_mlm_mask(MASK_TOKENS, mtp.rule, torch.Generator().manual_seed(4))[0]

    def run(ids: torch.Tensor | None = None, perturb: torch.Tensor | None = None) -> float:
        mtp.generator.manual_seed(4)
        tokens = TextTokens(ids if ids is not None else MASK_TOKENS.ids, MASK_TOKENS.lengths, MASK_TOKENS.special_mask)
        handle = None
        if perturb is not None:  # add noise to the decoder's output at the given positions
            handle = mtp.decoder.register_forward_hook(
                lambda m, i, out: out + 100.0 * torch.randn_like(out) * perturb[:, :out.shape[1], None])
        try:
            return mtp(_guided(TextFeatures(text.token_feats, text.global_feat, tokens), visual), {}).item()
        finally:
            if handle is not None:
                handle.remove()

    # other ids (targets) at unmasked and padded positions: same loss
    assert run(ids=torch.where(mask, MASK_TOKENS.ids, torch.randint(3, 20, mask.shape))) == pytest.approx(base)
    # decoder outputs (hence logits) changed at unmasked / padded positions: same loss
    assert run(perturb=(~mask).float()) == pytest.approx(base)
    # ... but a change at a masked position does change it
    assert run(perturb=mask.float()) != pytest.approx(base)
    assert run(ids=torch.where(mask, (MASK_TOKENS.ids + 1) % 20, MASK_TOKENS.ids)) != pytest.approx(base)


def test_mtp_decoder_uses_the_visual_tokens():
    _, mtp, text, visual = _mtp_case()
    mask = sample_mlm_mask(MASK_TOKENS, mtp.rule, torch.Generator().manual_seed(4))[0]
    a = mtp.predict(visual, text, mask)
    b = mtp.predict(visual + 1.0, text, mask)
    assert not torch.allclose(a, b)


# ---------------------------------------------------------------------------------------
# L_ras
# ---------------------------------------------------------------------------------------

# Three words, two visual positions. cos(t, v) picks n* = [0, 1, 1] (checked below):
#   t0=(1,0): cos 0.995 vs 0.447;  t1=(0,1): 0.0995 vs 0.894;  t2=(1,1): 0.774 vs 0.949.
RAS_T = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
RAS_V = [[2.0, 0.2], [0.5, 1.0]]
RAS_Z = [[3.0, 0.0], [0.0, 0.5]]  # codes at the two positions (D=2), projection = identity


def _ras_inputs(t=RAS_T, v=RAS_V, z=RAS_Z):
    token_feats = torch.tensor([t])  # (1, L, 2)
    visual = torch.tensor([v])  # (1, N, 2)
    z_q = torch.tensor(z).T.reshape(1, 2, 1, len(z)).clone().requires_grad_(True)  # (1, D, 1, N)
    return token_feats, visual, z_q


def _ras_by_hand(t, codes, pairs) -> float:
    """mean over ``pairs`` of (cos(c_l, c_m) − cos(t_l, t_m))²."""
    errs = [(_cos(codes[l], codes[m]) - _cos(t[l], t[m])) ** 2 for l, m in pairs]
    return sum(errs) / len(errs)


def test_ras_hand_computed():
    t, v, z = _ras_inputs()
    real = torch.ones(1, 3, dtype=torch.bool)
    loss, n_star = relationship_alignment(t, v, z, nn.Identity(), real)
    assert n_star.tolist() == [[0, 1, 1]]
    codes = [RAS_Z[0], RAS_Z[1], RAS_Z[1]]
    off_diag = [(l, m) for l in range(3) for m in range(3) if l != m]
    assert loss.item() == pytest.approx(_ras_by_hand(RAS_T, codes, off_diag), rel=1e-5)
    # explicitly: pairs (0,2) err 1/2 and (1,2) err (1-1/√2)², each twice, over 6 pairs
    assert loss.item() == pytest.approx((2 * 0.5 + 2 * (1 - 1 / math.sqrt(2)) ** 2) / 6, rel=1e-5)
    ref, _ = relationship_alignment(t, v, z, nn.Identity(), real, reduction="reference")
    assert ref.item() == pytest.approx((2 * 0.5 + 2 * (1 - 1 / math.sqrt(2)) ** 2) / 9, rel=1e-5)


def test_ras_zero_when_codes_reproduce_word_similarities():
    words = [[1.0, 0.0], [0.6, 0.8], [-0.28, 0.96]]
    # visual position n holds word n's direction and a code that is a rescaled copy of it
    t, v, z = _ras_inputs(t=words, v=words, z=[[2 * x for x in w] for w in words])
    for reduction in ("real_words", "reference"):
        loss, n_star = relationship_alignment(t, v, z, nn.Identity(), torch.ones(1, 3, dtype=torch.bool),
                                              reduction=reduction)
        assert n_star.tolist() == [[0, 1, 2]]
        assert loss.item() == pytest.approx(0.0, abs=1e-10)


def _ras_reference_by_hand(t, codes, real) -> float:
    """The reference's L_ras, transcribed (single caption, projection = identity):
        t̂ = t / ‖t‖;  q = (t̂ · mask) (t̂ · mask)ᵀ
        ĉ = c / ‖c‖;  p = (ĉ · mask) (ĉ · mask)ᵀ
        loss = MSELoss()(p, q)            # mean over all B·L·L entries
    with mask = 1 at real tokens, 0 at padding."""
    n = len(t)
    q = [[_cos(t[l], t[m]) * real[l] * real[m] for m in range(n)] for l in range(n)]
    p = [[_cos(codes[l], codes[m]) * real[l] * real[m] for m in range(n)] for l in range(n)]
    return sum((p[l][m] - q[l][m]) ** 2 for l in range(n) for m in range(n)) / (n * n)


def test_ras_reference_reduction_zeroes_padding_rows_and_columns():
    """One caption of 3 words + 1 padding token: padding counts in the divisor (16 entries)
    but not in the sum."""
    words = RAS_T + [[0.3, -1.0]]  # the padding position's arbitrary feature
    t, v, z = _ras_inputs(t=words)
    real = torch.tensor([[True, True, True, False]])
    loss, n_star = relationship_alignment(t, v, z, nn.Identity(), real)
    ref, _ = relationship_alignment(t, v, z, nn.Identity(), real, reduction="reference")
    codes = [RAS_Z[n] for n in n_star[0].tolist()]
    real_pairs = [(l, m) for l in range(3) for m in range(3) if l != m]
    assert loss.item() == pytest.approx(_ras_by_hand(words, codes, real_pairs), rel=1e-5)
    assert ref.item() == pytest.approx(_ras_reference_by_hand(words, codes, [1, 1, 1, 0]), rel=1e-5)
    # by hand: the real pairs (0,2) err 1/2 and (1,2) err (1-1/√2)², each twice, over 4·4 entries
    assert ref.item() == pytest.approx((2 * 0.5 + 2 * (1 - 1 / math.sqrt(2)) ** 2) / 16, rel=1e-5)
    # letting the padding entries into the sum (the old behaviour) gives another number
    every_entry = [(l, m) for l in range(4) for m in range(4)]
    assert ref.item() != pytest.approx(_ras_by_hand(words, codes, every_entry), rel=1e-2)
    # the padding word's feature changes neither reduction
    other_pad, _, _ = _ras_inputs(t=RAS_T + [[-5.0, 2.0]])
    for reduction, value in (("real_words", loss), ("reference", ref)):
        again, _ = relationship_alignment(other_pad, v, z, nn.Identity(), real, reduction=reduction)
        assert again.item() == pytest.approx(value.item(), rel=1e-6)


@pytest.mark.parametrize("reduction", ["real_words", "reference"])
def test_ras_padding_sends_no_gradient_to_codes(reduction):
    # the padding word (-1, -1) picks visual position 2, which no real word picks
    t, v, z = _ras_inputs(t=RAS_T + [[-1.0, -1.0]], v=RAS_V + [[-1.0, -1.0]], z=RAS_Z + [[1.0, 2.0]])
    real = torch.tensor([[True, True, True, False]])
    loss, n_star = relationship_alignment(t, v, z, nn.Identity(), real, reduction=reduction)
    assert n_star.tolist() == [[0, 1, 1, 2]]
    loss.backward()
    grad_norm = z.grad[0, :, 0].norm(dim=0)  # per visual position
    assert grad_norm[0] > 0 and grad_norm[1] > 0
    assert grad_norm[2] == 0


def test_ras_weight_factor_between_reductions():
    """At the same weight the default reduction is B·L²/#pairs times the reference's."""
    torch.manual_seed(0)
    b, length, n_pos = 3, 10, 6
    t, v = torch.randn(b, length, 5), torch.randn(b, n_pos, 5)
    z = torch.randn(b, 5, 2, 3)
    lengths = torch.tensor([4, 7, 10])
    real = torch.arange(length)[None] < lengths[:, None]
    default, _ = relationship_alignment(t, v, z, nn.Identity(), real)
    reference, _ = relationship_alignment(t, v, z, nn.Identity(), real, reduction="reference")
    factor = ras_strength_factor(real)
    assert factor == pytest.approx(b * length ** 2 / (4 * 3 + 7 * 6 + 10 * 9))
    assert default.item() == pytest.approx(factor * reference.item(), rel=1e-5)
    # the docstring's example: 15-word captions at L = 30 → ≈ 4.3×
    assert ras_strength_factor(torch.arange(30)[None] < 15) == pytest.approx(900 / 210)
    assert ras_strength_factor(torch.zeros(2, 5, dtype=torch.bool)) == 1.0


def test_ras_similarity_weighting_flips_signs_only():
    words = RAS_T + [[-1.0, -0.1]]  # every cosine with the visual tokens is negative: a < 0
    t, v, z = _ras_inputs(t=words)
    real = torch.ones(1, 4, dtype=torch.bool)
    weighted, n_star = relationship_alignment(t, v, z, nn.Identity(), real, weight_by_similarity=True)
    sims = [max(_cos(w, vis) for vis in RAS_V) for w in words]
    assert sims[3] < 0 < min(sims[:3])
    codes = [[x * (1 if s > 0 else -1) for x in RAS_Z[n]] for s, n in zip(sims, n_star[0].tolist())]
    pairs = [(l, m) for l in range(4) for m in range(4) if l != m]
    assert weighted.item() == pytest.approx(_ras_by_hand(words, codes, pairs), rel=1e-5)
    plain, _ = relationship_alignment(t, v, z, nn.Identity(), real)
    assert weighted.item() != pytest.approx(plain.item(), rel=1e-3)


def test_ras_gradient_reaches_only_the_chosen_codes():
    t, v, z = _ras_inputs(t=RAS_T, v=RAS_V + [[-1.0, -1.0]], z=RAS_Z + [[1.0, 1.0]])
    loss, n_star = relationship_alignment(t, v, z, nn.Identity(), torch.ones(1, 3, dtype=torch.bool))
    loss.backward()
    grad_norm = z.grad[0, :, 0].norm(dim=0)  # per visual position
    assert n_star.tolist() == [[0, 1, 1]]
    assert grad_norm[0] > 0 and grad_norm[1] > 0 and grad_norm[2] == 0


def test_ras_module_counts_real_words_only():
    encoder = FakeTextEncoder(width=2, global_width=2, embed_width=4, max_length=7)
    ras = RelationshipAlignment()
    ras.setup(_guide(encoder, code_dim=3))
    linear = ras.project[0]
    assert (linear.in_features, linear.out_features) == (3, 2) and ras.project[2].eps >= 1e-5
    assert linear.weight.std().item() == pytest.approx(0.01, rel=0.8)
    torch.manual_seed(0)
    text = TextFeatures(torch.randn(2, 7, 2), torch.randn(2, 2), MASK_TOKENS)
    visual, z_q = torch.randn(2, 5, 2), torch.randn(2, 3, 1, 4)
    got = ras(_guided(text, visual, z_q), {})
    words = eligible_tokens(MASK_TOKENS)  # not special, not padding
    expected, _ = relationship_alignment(text.token_feats, visual[:, 1:], z_q, ras.project, words)
    assert got.item() == pytest.approx(expected.item())
    with_special = RelationshipAlignment(include_special=True)
    with_special.project = ras.project
    with_special._is_set_up = True
    assert with_special(_guided(text, visual, z_q), {}).item() != pytest.approx(expected.item())
    with pytest.raises(ValueError, match="reduction"):
        RelationshipAlignment(reduction="sum")


def test_losses_are_registered():
    import lgvq_plugins

    assert {"gsa", "mtp", "ras"} <= set(lgvq_plugins.list_alignment_losses())
    assert isinstance(lgvq_plugins.create_alignment_loss("gsa", temperature=0.5), GlobalSemanticAlignment)


@pytest.mark.ddp
def test_gsa_gathers_negatives_across_ranks():
    """2 gloo processes: rank-averaged L_gsa (and its gradients) equal the single-process
    loss over the concatenated batch."""
    from pathlib import Path

    from ddp import torchrun

    script = Path(__file__).resolve().parent / "scripts" / "gsa_ddp_worker.py"
    proc = torchrun([str(script)], nproc=2, timeout=120)
    assert "rank 0: gsa ddp ok" in proc.stdout and "rank 1: gsa ddp ok" in proc.stdout


def test_loss_defaults_are_the_documented_reference_values():
    """docs/reference.md: mtp decoder 2 layers × 8 heads, MLP ratio 4, label smoothing 0.1, mask
    ratio from N(0.5, 0.1) truncated to [0.1, 0.3], at least one token masked; gsa at
    temperature 1, one-directional; ras over real words, unweighted, special tokens out."""
    import inspect

    from lgvq_plugins.guidance.losses import GlobalSemanticAlignment, MaskedTextPrediction, RelationshipAlignment

    def defaults(cls):
        return {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}

    mtp = defaults(MaskedTextPrediction)
    assert {k: mtp[k] for k in ("depth", "heads", "mlp_ratio", "dropout", "label_smoothing", "mask_ratio_mean",
                                "mask_ratio_std", "mask_ratio_low", "mask_ratio_high", "mask_min_one")} == {
        "depth": 2, "heads": 8, "mlp_ratio": 4.0, "dropout": 0.0, "label_smoothing": 0.1, "mask_ratio_mean": 0.5,
        "mask_ratio_std": 0.1, "mask_ratio_low": 0.1, "mask_ratio_high": 0.3, "mask_min_one": True}
    assert defaults(GlobalSemanticAlignment) == {"temperature": 1.0, "symmetric": False}
    assert defaults(RelationshipAlignment) == {"reduction": "real_words", "weight_by_similarity": False,
                                               "include_special": False}


@pytest.mark.parametrize("missing", ["text", "visual_tokens"])
def test_a_loss_without_captions_or_visual_tokens_names_what_is_missing(missing):
    from lgvq_plugins.guidance.losses import _require_text

    guided = types.SimpleNamespace(text=object(), visual_tokens=object())
    setattr(guided, missing, None)  # either one alone is enough to refuse
    with pytest.raises(ValueError) as err:
        _require_text(guided, "gsa")
    assert str(err.value) == ("alignment loss 'gsa' needs caption features and visual tokens; "
                              "call LanguageGuided with captions (guidance enabled)")


def test_gsa_temperature_must_be_positive_with_the_exact_message():
    from lgvq_plugins.guidance.losses import GlobalSemanticAlignment

    with pytest.raises(ValueError) as err:
        GlobalSemanticAlignment(temperature=0.0)
    assert str(err.value).splitlines()[0] == "gsa.temperature must be > 0, got 0.0"
    assert GlobalSemanticAlignment(temperature=1e-3).temperature == pytest.approx(1e-3)
