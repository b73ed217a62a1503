"""LanguageGuided: the on/off toggle, what is (not) trained and saved, weighting, gradients
into every registered tokenizer, a plugin's fourth loss, gin blocks, and the code-text layers."""

from __future__ import annotations

from pathlib import Path

import gin
import pytest
import torch
from torch import nn

import lgvq_plugins
from fakes import CAPTIONS, FakeTextEncoder, FakeTokenizer
from lgvq_plugins.guidance.code_text import CodeTextTransformer, TextDecoder
from lgvq_plugins.guidance import REFERENCE_LOSS_WEIGHTS, LanguageGuided
from lgvq_plugins.hookspecs import hookimpl
from lgvq_plugins.interfaces import GuidedOutput

GIN = Path(__file__).resolve().parent.parent / "gin" / "guidance"
SMALL = {"width": 32, "heads": 4}  # code-text transformer size for tests


def _images(b: int = 4, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _guided(losses=None, **kwargs) -> LanguageGuided:
    torch.manual_seed(0)
    kwargs = {**SMALL, **kwargs}
    return LanguageGuided(FakeTokenizer(), FakeTextEncoder(), losses=losses, **kwargs)


# ---------------------------------------------------------------------------------------
# The toggle and what is trained / saved
# ---------------------------------------------------------------------------------------


def test_disabled_gives_exactly_the_tokenizer():
    torch.manual_seed(0)
    tokenizer = FakeTokenizer()
    model = LanguageGuided(tokenizer, enabled=False).eval()
    x = _images()
    reconstruction, quantized = tokenizer(x)
    out = model(x, CAPTIONS)
    assert torch.equal(out.reconstruction, reconstruction)
    assert torch.equal(out.quantized.z_q, quantized.z_q) and torch.equal(out.quantized.indices, quantized.indices)
    assert out.quantized.loss == quantized.loss
    assert out.losses == {} and out.raw_losses == {} and out.text is None and out.visual_tokens is None
    assert model.text_encoder is None and model.code_text is None and list(model.guidance_parameters()) == []
    assert set(model.state_dict()) == {f"tokenizer.{k}" for k in tokenizer.state_dict()}


def test_off_gin_is_one_line_toggle():
    gin.parse_config_files_and_bindings([str(GIN / "lg.gin"), str(GIN / "off.gin")], [])
    model = LanguageGuided(FakeTokenizer(), text_encoder=FakeTextEncoder())
    assert not model.enabled and model.text_encoder is None and len(model.alignment_losses) == 0


def test_text_encoder_is_frozen_and_outside_the_module_tree():
    model = _guided()
    encoder = model.text_encoder
    frozen = {id(p) for p in encoder.parameters()}
    assert not any(id(p) in frozen for p in model.parameters())
    assert all(k.split(".")[0] in {"tokenizer", "code_text", "alignment_losses"} for k in model.state_dict())
    trained = {id(p) for p in model.tokenizer.parameters()} | {id(p) for p in model.guidance_parameters()}
    assert trained == {id(p) for p in model.parameters()}
    assert not any(p.requires_grad for p in encoder.parameters())
    model.train()
    assert not encoder.training
    # .to() moves / casts the encoder with the rest (dtype stands in for a device here)
    model.to(torch.float64)
    assert encoder.embedding.dtype == torch.float64 and model.code_text.pos_embed.dtype == torch.float64
    out = model(_images().double(), CAPTIONS)
    assert out.visual_tokens.dtype == torch.float64
    assert set(out.raw_losses) == {"gsa", "mtp", "ras"} and all(torch.isfinite(v) for v in out.raw_losses.values())


def test_checkpoint_round_trip_without_the_encoder():
    model = _guided()
    state = model.state_dict()
    fresh = LanguageGuided(FakeTokenizer(), FakeTextEncoder(), **SMALL)
    fresh.load_state_dict(state)  # strict: exactly the same keys
    model.eval(), fresh.eval()
    x = _images()
    torch.manual_seed(1)
    a = model(x, CAPTIONS)
    torch.manual_seed(1)
    b = fresh(x, CAPTIONS)
    assert torch.equal(a.visual_tokens, b.visual_tokens)
    assert all(torch.equal(a.raw_losses[k], b.raw_losses[k]) for k in a.raw_losses)


# ---------------------------------------------------------------------------------------
# Losses: weighting, choice, gradients
# ---------------------------------------------------------------------------------------


def test_default_weights_are_the_reference():
    model = _guided()
    assert model.weights == REFERENCE_LOSS_WEIGHTS == {"gsa": 0.001, "mtp": 0.01, "ras": 0.0001}


def test_losses_weighted_and_raw():
    model = _guided(losses={"gsa": 0.5, "mtp": 2.0, "ras": 0.25})
    out = model(_images(), CAPTIONS)
    assert isinstance(out, GuidedOutput) and set(out.losses) == {"gsa", "mtp", "ras"}
    for name, weight in {"gsa": 0.5, "mtp": 2.0, "ras": 0.25}.items():
        assert out.raw_losses[name].dim() == 0 and torch.isfinite(out.raw_losses[name])
        assert out.losses[name].item() == pytest.approx(weight * out.raw_losses[name].item())
    b, n = 4, 1 + 4 * 4
    assert out.visual_tokens.shape == (b, n, 32) and out.text.token_feats.shape[0] == b


def test_zero_weight_leaves_the_loss_out_and_bad_settings_fail_clearly():
    model = _guided(losses={"gsa": 1.0, "ras": 0.0})
    assert list(model.alignment_losses) == ["gsa"]
    assert set(model(_images(), CAPTIONS).losses) == {"gsa"}
    with pytest.raises(lgvq_plugins.UnknownComponentError, match="gsa"):
        _guided(losses={"gas": 1.0})
    with pytest.raises(ValueError, match="weight"):
        _guided(losses={"gsa": -1.0})


@pytest.mark.parametrize("name", ["gsa", "mtp", "ras"])
def test_each_loss_sends_gradients_to_the_tokenizer_encoder(name):
    model = _guided(losses={name: 1.0})
    out = model(_images(), CAPTIONS)
    out.raw_losses[name].backward()
    first_conv = model.tokenizer.encoder[0].weight
    assert first_conv.grad is not None and first_conv.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.alignment_losses[name].parameters())
    assert model.tokenizer.decoder[0].weight.grad is None  # alignment never touches the decoder


def test_captions_from_batch_and_missing_captions():
    model = _guided()
    out = model(_images(), batch={"caption": CAPTIONS})
    assert set(out.losses) == {"gsa", "mtp", "ras"}
    with pytest.raises(ValueError, match="enabled = False"):
        model(_images())
    with pytest.raises(ValueError, match="captions for"):
        model(_images(), CAPTIONS[:2])
    model.eval()
    out = model(_images())
    assert out.losses == {} and out.visual_tokens is not None


def test_each_caption_encoded_once():
    model = _guided()
    model(_images(), CAPTIONS)
    model(_images(seed=1), CAPTIONS[::-1])
    model(_images(), [CAPTIONS[0]] * 4)
    stats = model.text_cache.stats
    assert stats.captions_encoded == len(set(CAPTIONS)) == model.text_encoder.encode_calls
    assert stats.encoder_calls == 1


# ---------------------------------------------------------------------------------------
# A fourth loss from a plugin, without touching the core
# ---------------------------------------------------------------------------------------


class CodeNormPenalty(nn.Module):
    """A toy fourth alignment loss: mean squared norm of v_0, scaled by a learnt factor."""

    def setup(self, guide) -> None:
        self.scale = nn.Parameter(torch.tensor(2.0))
        self.seen_width = guide.visual_width

    def forward(self, guided: GuidedOutput, batch) -> torch.Tensor:
        return self.scale * guided.visual_tokens[:, 0].square().sum(-1).mean()


class FourthLossPlugin:
    @hookimpl
    def register_alignment_losses(self, register):
        register("code_norm", CodeNormPenalty)


def test_plugin_registers_a_fourth_loss():
    host = lgvq_plugins.get_host()
    name = host.register_plugin(FourthLossPlugin(), name="fourth-loss-test")
    try:
        assert "code_norm" in lgvq_plugins.list_alignment_losses()
        model = _guided(losses={"gsa": 0.001, "code_norm": 0.5})
        out = model(_images(), CAPTIONS)
        v0 = out.visual_tokens[:, 0]
        expected = 2.0 * v0.square().sum(-1).mean()
        assert out.raw_losses["code_norm"].item() == pytest.approx(expected.item())
        assert out.losses["code_norm"].item() == pytest.approx(0.5 * expected.item())
        assert model.alignment_losses["code_norm"].seen_width == 32
        assert any(p is model.alignment_losses["code_norm"].scale for p in model.guidance_parameters())
        assert "alignment_losses.code_norm.scale" in model.state_dict()
    finally:
        host.unregister_plugin(name)
    assert "code_norm" not in lgvq_plugins.list_alignment_losses()


# ---------------------------------------------------------------------------------------
# Every registered tokenizer
# ---------------------------------------------------------------------------------------

TINY_BACKBONES = {
    "vqvae": dict(embed_dim=8, z_channels=8, ch=8, ch_mult=(1, 2, 2), num_res_blocks=1),
    "vqgan": dict(embed_dim=8, z_channels=8, ch=8, ch_mult=(1, 2, 2), num_res_blocks=1,
                  attn_resolutions=(4,), resolution=16, disc_ndf=8, disc_n_layers=1),
}
TINY_QUANTIZERS = {"vq": {"num_codes": 16}, "cvq": {"num_codes": 16}, "vqtorch_vq": {"num_codes": 16},
                   "vqtorch_fsq": {"levels": (4, 4)}}


@pytest.mark.parametrize("backbone", lgvq_plugins.list_backbones())
def test_guidance_wraps_every_registered_tokenizer(backbone):
    if backbone not in TINY_BACKBONES:
        pytest.skip(f"no tiny configuration known for third-party backbone {backbone!r}")
    torch.manual_seed(0)
    tokenizer = lgvq_plugins.create_backbone(backbone, quantizer="vq", quantizer_config={"num_codes": 16},
                                             **TINY_BACKBONES[backbone])
    model = LanguageGuided(tokenizer, FakeTextEncoder(), image_size=16, **SMALL).train()
    out = model(_images(), CAPTIONS)
    h, w = tokenizer.grid(16)
    assert out.visual_tokens.shape == (4, 1 + h * w, 32)
    encoder_params = [p for n, p in tokenizer.named_parameters() if n.startswith("encoder.")]
    assert encoder_params
    for name, raw in out.raw_losses.items():
        grads = torch.autograd.grad(raw, encoder_params, retain_graph=True, allow_unused=True)
        assert any(g is not None and g.abs().sum() > 0 for g in grads), f"{name} does not reach {backbone}'s encoder"
    gen = tokenizer.generator_loss(_images(), out.reconstruction, out.quantized, step=0)
    (gen.loss + sum(out.losses.values())).backward()


@pytest.mark.parametrize("quantizer", lgvq_plugins.list_quantizers())
def test_guidance_with_every_registered_quantizer(quantizer):
    config = TINY_QUANTIZERS.get(quantizer)
    if config is None:
        pytest.skip(f"no tiny configuration known for third-party quantizer {quantizer!r}")
    torch.manual_seed(0)
    tokenizer = lgvq_plugins.create_backbone("vqvae", quantizer=quantizer, quantizer_config=config,
                                             **TINY_BACKBONES["vqvae"])
    model = LanguageGuided(tokenizer, FakeTextEncoder(), losses={"ras": 1.0}, image_size=16, **SMALL)
    out = model(_images(), CAPTIONS)
    out.raw_losses["ras"].backward()
    grads = [p.grad for n, p in tokenizer.named_parameters() if n.startswith("encoder.")]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_real_text_encoder_by_name():
    torch.manual_seed(0)
    model = LanguageGuided(FakeTokenizer(), "minilm", **SMALL)
    out = model(_images(2), ["a red bird", "a woman holding a racket"])
    assert model.visual_width == 384 and out.visual_tokens.shape[-1] == 384
    assert model.alignment_losses["mtp"].head.bias.shape == (model.text_encoder.vocab_embeddings.shape[0],)
    assert all(torch.isfinite(v) for v in out.raw_losses.values())
    assert not any(k.startswith("text") for k in model.state_dict())


# ---------------------------------------------------------------------------------------
# Geometry and gin
# ---------------------------------------------------------------------------------------


def test_positional_embeddings_sized_from_the_grid():
    tokenizer = FakeTokenizer(image_size=None)
    with pytest.raises(ValueError, match="LanguageGuided.image_size"):
        LanguageGuided(tokenizer, FakeTextEncoder(), **SMALL)
    model = LanguageGuided(tokenizer, FakeTextEncoder(), image_size=(24, 32), **SMALL)
    assert model.grid == (6, 8) and model.code_text.pos_embed.shape == (1, 1 + 48, 32)
    from_config = LanguageGuided(FakeTokenizer(image_size=40), FakeTextEncoder(), **SMALL)
    assert from_config.code_text.pos_embed.shape == (1, 1 + 100, 32)
    # another resolution at run time: interpolated embeddings, same global one
    out = model(_images(size=16), CAPTIONS)
    assert out.visual_tokens.shape == (4, 1 + 16, 32)
    pos = model.code_text.positional_embedding((6, 8))
    assert pos is model.code_text.pos_embed
    assert torch.equal(model.code_text.positional_embedding((3, 4))[:, 0], pos[:, 0])


def test_layer_norms_are_half_precision_safe():
    ct = CodeTextTransformer(8, 16, (2, 2), width=16, heads=2)
    dec = TextDecoder(16, 5, heads=2)
    norms = [m for m in [*ct.modules(), *dec.modules()] if isinstance(m, nn.LayerNorm)]
    assert norms and all(m.eps >= 1e-5 for m in norms)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v = ct(torch.randn(2, 8, 2, 2))
        padding = torch.tensor([[False, False, True, True, True], [True] * 5])  # second: no real token
        out = dec(torch.randn(2, 5, 16), torch.zeros(2, 5, dtype=torch.bool), padding, v)
    assert torch.isfinite(out.float()).all()


def test_decoder_ignores_padding_keys():
    torch.manual_seed(0)
    dec = TextDecoder(16, 6, heads=2).eval()
    feats, visual = torch.randn(1, 6, 16), torch.randn(1, 5, 16)
    padding = torch.tensor([[False, False, False, False, True, True]])
    mask = torch.tensor([[False, True, False, False, False, False]])
    a = dec(feats, mask, padding, visual)
    changed = feats.clone()
    changed[:, 4:] = 100.0  # padding features
    b = dec(changed, mask, padding, visual)
    assert torch.allclose(a[:, :4], b[:, :4], atol=1e-5)
    # a masked word's own feature is invisible to the decoder
    changed = feats.clone()
    changed[:, 1] = -100.0
    assert torch.allclose(a, dec(changed, mask, padding, visual), atol=1e-5)


def test_gin_weight_presets():
    cases = {"lg.gin": {"gsa": 0.001, "mtp": 0.01, "ras": 0.0001},
             "weights_celeba_textcaps.gin": {"gsa": 0.001, "mtp": 0.01, "ras": 0.0001},
             "weights_cub.gin": {"gsa": 0.001, "mtp": 0.001, "ras": 0.001}}
    for name, weights in cases.items():
        gin.clear_config()
        files = [str(GIN / "lg.gin")] + ([str(GIN / name)] if name != "lg.gin" else [])
        gin.parse_config_files_and_bindings(files, ["gsa.temperature = 0.5"])
        model = LanguageGuided(FakeTokenizer(), text_encoder=FakeTextEncoder(), width=32, heads=4)
        assert model.enabled and model.weights == weights
        assert model.alignment_losses["gsa"].temperature == 0.5  # registry names are bindable
        assert gin.query_parameter("LanguageGuided.text_encoder") == "minilm"


def test_factored_cross_attention_equals_the_plain_one():
    """mtp cross-attends through (hidden, proj_out): same outputs and gradients as through
    the visual tokens themselves."""
    torch.manual_seed(0)
    ct = CodeTextTransformer(8, 32, (2, 3), width=16, heads=2).double()
    dec = TextDecoder(32, 6, heads=4).double()
    z = torch.randn(2, 8, 2, 3, dtype=torch.float64)
    feats = torch.randn(2, 6, 32, dtype=torch.float64)
    padding = torch.tensor([[False] * 4 + [True] * 2, [False] * 6])
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[:, 1] = True

    def run(factored: bool):
        ct.zero_grad()
        hidden = ct.hidden(z)
        out = dec(feats, mask, padding, hidden, ct.proj_out) if factored else \
            dec(feats, mask, padding, ct.proj_out(hidden))
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in ct.parameters()]

    plain, plain_grads = run(False)
    factored, factored_grads = run(True)
    assert torch.allclose(plain, factored, atol=1e-10)
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(plain_grads, factored_grads))


def test_default_code_text_width_follows_the_code_width():
    model = LanguageGuided(FakeTokenizer(embed_dim=8), FakeTextEncoder())
    assert model.code_text.width == 64 and model.code_text.blocks[0].attn.num_heads == 2
    big = LanguageGuided(FakeTokenizer(embed_dim=96), FakeTextEncoder())
    assert big.code_text.width == 96 and big.code_text.blocks[0].attn.num_heads == 3


def test_alignment_losses_in_fp32_under_bf16_autocast():
    model = _guided(losses={"gsa": 1.0, "mtp": 1.0, "ras": 1.0})
    x = _images()
    torch.manual_seed(0)
    reference = model(x, CAPTIONS).raw_losses
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, CAPTIONS)
        sum(out.losses.values()).backward()
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in out.raw_losses.values())
    # the code-text transformer runs in bf16, the similarities in fp32
    for name in ("gsa", "ras"):
        assert out.raw_losses[name].item() == pytest.approx(reference[name].item(), rel=0.05)
    assert model.tokenizer.encoder[0].weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------
# guidance/reference.gin: the reference's losses
# ---------------------------------------------------------------------------------------


def test_reference_preset_builds_the_reference_losses():
    gin.clear_config()
    try:
        gin.parse_config_files_and_bindings([str(GIN / "lg.gin"), str(GIN / "reference.gin")], [])
        torch.manual_seed(0)
        model = LanguageGuided(FakeTokenizer(), FakeTextEncoder(), width=32)
    finally:
        gin.clear_config()
    gsa, mtp, ras = (model.alignment_losses[k] for k in ("gsa", "mtp", "ras"))
    assert (gsa.temperature, gsa.symmetric) == (1.0, False)
    assert (ras.reduction, ras.weight_by_similarity, ras.include_special) == ("reference", True, True)
    assert mtp.label_smoothing == 0.1 and not mtp.rule.min_one
    assert (mtp.rule.mean, mtp.rule.std, mtp.rule.low, mtp.rule.high) == (0.5, 0.1, 0.1, 0.3)
    assert model.weights == REFERENCE_LOSS_WEIGHTS
    assert model.code_text.blocks[0].attn.num_heads == 1
    # the text decoder: 2 post-LN layers, 1 head, ReLU feed-forward of width 512, eps 1e-12,
    # dropout 0.1 after each sub-layer and after the activation, no positional encoding
    layers = mtp.decoder.layers
    assert len(layers) == 2
    for layer in layers:
        assert layer.self_attn.heads == 1 and layer.cross_attn.heads == 1
        assert layer.self_attn.dropout == 0.0  # no dropout on attention weights
        first, act, second = layer.mlp
        assert (first.out_features, second.in_features) == (512, 512)
        assert isinstance(act[0], nn.ReLU) and act[1].p == 0.1 and layer.drop.p == 0.1
        assert all(n.eps == 1e-12 for n in (layer.norm1, layer.norm2, layer.norm3))
    assert not any("pos" in name for name, _ in mtp.decoder.named_parameters())
    # post-LN, computed by hand for one layer (eval: no dropout)
    layer = layers[0].eval()
    first, _, second = layer.mlp
    x, ctx = torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    pad = torch.tensor([[False] * 5, [False, False, False, True, True]])
    h = layer.norm1(x + layer.self_attn(x, x, pad))
    h = layer.norm2(h + layer.cross_attn(h, ctx))
    h = layer.norm3(h + second(torch.relu(first(h))))
    assert torch.allclose(layer(x, ctx, pad), h, atol=1e-6)
    out = model.train()(_images(), CAPTIONS)
    assert set(out.raw_losses) == {"gsa", "mtp", "ras"}
    assert all(torch.isfinite(v) for v in out.raw_losses.values())
