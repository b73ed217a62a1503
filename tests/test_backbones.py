"""Tokenizer backbones: the ``Tokenizer`` contract for every registered backbone × quantizer,
the VQ-GAN objectives (GAN warm-up, adaptive weight, discriminator isolation), config
round-trips, the gin blocks and the perceptual losses."""

from __future__ import annotations

import inspect
import json
import urllib.error
from typing import Any

import gin
import pytest
import torch
from torch import nn

import lgvq_plugins
from lgvq_plugins.backbones.discriminator import ActNorm, NLayerDiscriminator, hinge_d_loss
from lgvq_plugins.backbones.perceptual import LPIPS, PerceptualWeightsError
from lgvq_plugins.backbones.tokenizer_base import VQTokenizer
from lgvq_plugins.backbones.vqgan import adaptive_weight
from lgvq_plugins.config import bundled_gin_dir, resolve_gin_file
from lgvq_plugins.interfaces import LossOutput, Quantized, Tokenizer

BACKBONES = lgvq_plugins.list_backbones()
QUANTIZERS = lgvq_plugins.list_quantizers()
SIZE = 32
DISC_START = 3


def _accepts(factory: Any, name: str) -> bool:
    params = inspect.signature(factory).parameters
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def tiny_kwargs(backbone: str, quantizer: str, **overrides: Any) -> dict[str, Any]:
    """Tiny sizes (32×32 images, ch 16), keeping only the arguments the backbone takes, so
    any backbone following the built-ins' argument names is tested."""
    q_factory = lgvq_plugins.registry("quantizer").entry(quantizer).original
    q_config = {"num_codes": 32} if _accepts(q_factory, "num_codes") else {}
    wanted = dict(quantizer=quantizer, quantizer_config=q_config, embed_dim=16, z_channels=16, ch=16,
                  ch_mult=(1, 2), num_res_blocks=1, resolution=SIZE, attn_resolutions=(16,),
                  disc_start=DISC_START, disc_ndf=8, disc_n_layers=2)
    wanted.update(overrides)
    factory = lgvq_plugins.registry("backbone").entry(backbone).original
    return {k: v for k, v in wanted.items() if _accepts(factory, k)}


def make(backbone: str, quantizer: str, seed: int = 0, **overrides: Any) -> nn.Module:
    torch.manual_seed(seed)
    return lgvq_plugins.create_backbone(backbone, **tiny_kwargs(backbone, quantizer, **overrides))


def images(batch: int = 2, size: int | tuple[int, int] = SIZE, seed: int = 1) -> torch.Tensor:
    H, W = (size, size) if isinstance(size, int) else size
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, H, W, generator=g) * 2 - 1


def _disc_ids(model: nn.Module) -> set[int]:
    return {id(p) for p in model.discriminator_parameters()}


combos = pytest.mark.parametrize("backbone,quantizer",
                                 [(b, q) for b in BACKBONES for q in QUANTIZERS])


@pytest.fixture(autouse=True)
def _clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


# ---------------------------------------------------------------------------------------
# The contract, for every backbone × quantizer
# ---------------------------------------------------------------------------------------


def check_contract(model: nn.Module, name: str, x: torch.Tensor) -> None:
    """Shapes, grid, decode_indices and the config round-trip (shared with the in-code
    registration test)."""
    assert isinstance(model, Tokenizer)
    rec, q = model(x)
    h, w = model.grid(tuple(x.shape[-2:]))
    assert isinstance(q, Quantized)
    assert rec.shape == x.shape
    assert q.z_q.shape == (x.shape[0], model.embed_dim, h, w)
    assert q.indices.shape == (x.shape[0], h, w) and q.indices.dtype == torch.int64
    assert q.loss.ndim == 0 and torch.isfinite(q.loss)
    out = model.generator_loss(x, rec, q, step=0)
    assert isinstance(out, LossOutput) and out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert out.loss.requires_grad

    model.eval()
    with torch.no_grad():
        q = model.encode(x)
        torch.testing.assert_close(model.decode_indices(q.indices), model.decode(q.z_q), rtol=0, atol=1e-6)

    config = json.loads(json.dumps(model.config))  # what save_pretrained writes
    rebuilt = lgvq_plugins.create_backbone(name, **config)
    assert rebuilt.load_state_dict(model.state_dict()).missing_keys == []
    rebuilt.eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(x)[0], model(x)[0])
        assert torch.equal(rebuilt.encode(x).indices, model.encode(x).indices)


@combos
def test_contract(backbone: str, quantizer: str) -> None:
    model = make(backbone, quantizer)
    assert model.config["quantizer"] == quantizer
    check_contract(model, backbone, images())


@combos
def test_grid_matches_encode(backbone: str, quantizer: str) -> None:
    model = make(backbone, quantizer)
    for size in [(SIZE, SIZE), (16, 48)]:
        q = model.encode(images(size=size))
        assert model.grid(size) == tuple(q.indices.shape[-2:]) == tuple(q.z_q.shape[-2:])
    assert model.grid(SIZE) == model.grid((SIZE, SIZE))


@combos
def test_generator_gradients(backbone: str, quantizer: str) -> None:
    """Gradients from the generator objective (GAN on) reach every encoder and decoder
    weight and every learned quantizer weight, and never the discriminator."""
    model = make(backbone, quantizer)
    x = images()
    rec, q = model(x)
    model.generator_loss(x, rec, q, step=DISC_START + 1).loss.backward()
    disc = _disc_ids(model)
    for part in ("encoder", "decoder"):
        for name, p in getattr(model, part).named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), f"{part}.{name}"
        assert sum(p.grad.abs().sum() for p in getattr(model, part).parameters()) > 0
    learned = [(n, p) for n, p in model.quantizer.named_parameters() if p.requires_grad]
    for name, p in learned:
        assert p.grad is not None and torch.isfinite(p.grad).all(), f"quantizer.{name}"
    if learned:
        assert sum(p.grad.abs().sum() for _, p in learned) > 0
    for p in model.parameters():
        if id(p) in disc:
            assert p.grad is None


@combos
def test_discriminator_isolation(backbone: str, quantizer: str) -> None:
    """The discriminator objective trains only discriminator weights; a generator step over
    *all* parameters leaves them unchanged."""
    model = make(backbone, quantizer)
    x = images()
    rec, q = model(x)
    disc = _disc_ids(model)
    d = model.discriminator_loss(x, rec.detach(), step=DISC_START)
    if not disc:
        assert d is None
        return
    d.loss.backward()
    for p in model.parameters():
        if id(p) in disc:
            assert p.grad is not None
        else:
            assert p.grad is None
    assert sum(p.grad.abs().sum() for p in model.discriminator_parameters()) > 0

    model.zero_grad(set_to_none=True)
    before = [p.detach().clone() for p in model.discriminator_parameters()]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    rec, q = model(x)
    model.generator_loss(x, rec, q, step=DISC_START).loss.backward()
    opt.step()
    for old, p in zip(before, model.discriminator_parameters()):
        assert torch.equal(old, p)


@combos
def test_gan_warmup(backbone: str, quantizer: str) -> None:
    model = make(backbone, quantizer)
    if not model.discriminator_parameters():
        pytest.skip(f"{backbone} has no discriminator")
    x = images()
    rec, q = model(x)
    before = model.generator_loss(x, rec, q, step=DISC_START - 1)
    assert float(before.logs["g_gan"]) == 0.0 and float(before.logs["d_weight"]) == 0.0
    expected = before.logs["rec"] + model.codebook_weight * q.loss.detach()
    assert torch.equal(before.loss.detach(), expected)
    d_before = model.discriminator_loss(x, rec.detach(), step=DISC_START - 1)
    assert float(d_before.loss) == 0.0 and not d_before.loss.requires_grad  # nothing to backprop

    after = model.generator_loss(x, rec, q, step=DISC_START)
    assert float(after.logs["g_gan"]) != 0.0 and float(after.logs["d_weight"]) > 0.0
    torch.testing.assert_close(after.loss.detach(), expected + after.logs["g_gan"])
    assert float(model.discriminator_loss(x, rec.detach(), step=DISC_START).loss.detach()) > 0.0


# ---------------------------------------------------------------------------------------
# VQ-GAN specifics
# ---------------------------------------------------------------------------------------


def test_adaptive_weight_hand_computed() -> None:
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    rec_loss = (w * torch.tensor([3.0, 4.0])).sum()  # ∇ = (3, 4), norm 5
    gan_loss = (w * torch.tensor([0.0, 2.0])).sum()  # ∇ = (0, 2), norm 2
    assert float(adaptive_weight(rec_loss, gan_loss, w, 0.8)) == pytest.approx(0.8 * 5 / (2 + 1e-4))
    flat = (w * 0.0).sum()  # ∇ = 0: 5 / 1e-4 = 5e4 is clamped to 1e4
    assert float(adaptive_weight(rec_loss, flat, w, 0.5)) == pytest.approx(0.5 * 1e4)
    with torch.no_grad():
        assert float(adaptive_weight((w * 3).sum(), (w * 2).sum(), w, 0.8)) == 0.0
    assert w.grad is None  # measured with autograd.grad, nothing accumulated


@pytest.mark.requires_vqtorch
def test_adaptive_weight_in_vqgan_matches_gradient_ratio() -> None:
    model = make("vqgan", "vqtorch_vq", disc_weight=0.7)
    x = images()
    rec, q = model(x)
    out = model.generator_loss(x, rec, q, step=DISC_START)
    rec_loss = (x - rec).abs().mean()  # pixel_weight 1, no perceptual network
    gan_loss = -model.discriminator(rec).mean()
    g_rec, = torch.autograd.grad(rec_loss, model.last_layer, retain_graph=True)
    g_gan, = torch.autograd.grad(gan_loss, model.last_layer, retain_graph=True)
    expected = 0.7 * (g_rec.norm() / (g_gan.norm() + 1e-4)).clamp(0, 1e4)
    torch.testing.assert_close(out.logs["d_weight"], expected)
    assert model.last_layer is model.decoder.conv_out.weight


def test_vqgan_eval_and_no_grad_are_safe() -> None:
    model = make("vqgan", "vq").eval()
    x = images()
    with torch.no_grad():
        rec, q = model(x)
        out = model.generator_loss(x, rec, q, step=DISC_START + 10)
    assert float(out.logs["d_weight"]) == 0.0 and float(out.logs["g_gan"]) == 0.0
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("quantizer", [q for q in ("vq", "cvq") if q in QUANTIZERS])
def test_autocast_bf16(quantizer: str) -> None:
    """Under bf16 autocast the objective stays fp32 and finite and backpropagates."""
    model = make("vqgan", quantizer)
    x = images()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rec, q = model(x)
        out = model.generator_loss(x, rec, q, step=DISC_START)
    assert q.z_q.dtype == torch.float32  # the quantizer's fp32 output is passed on as is
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()


@pytest.mark.requires_vqtorch
def test_attention_placement_and_last_layer() -> None:
    """attn_resolutions refers to feature-map sides for ``resolution``-sized inputs; the
    middle block always attends in VQ-GAN and never in VQ-VAE."""
    from lgvq_plugins.backbones.layers import AttnBlock

    model = make("vqgan", "vqtorch_vq", ch_mult=(1, 2, 2), attn_resolutions=(16,))  # sides 32, 16, 8
    assert [isinstance(s.attn[0], AttnBlock) for s in model.encoder.down] == [False, True, False]
    assert [isinstance(s.attn[0], AttnBlock) for s in model.decoder.up] == [False, True, False]
    assert isinstance(model.encoder.mid[1], AttnBlock) and isinstance(model.decoder.mid[1], AttnBlock)
    assert model.grid(SIZE) == (8, 8) and model.downsample_factor == 4
    vqvae = make("vqvae", "vqtorch_vq", ch_mult=(1, 2, 2))
    assert not any(isinstance(m, AttnBlock) for m in vqvae.modules())
    assert vqvae.last_layer is vqvae.decoder.conv_out.weight and vqvae.last_layer.shape[0] == 3


@pytest.mark.requires_vqtorch
def test_vqvae_has_no_gan() -> None:
    model = make("vqvae", "vqtorch_vq")
    x = images()
    rec, q = model(x)
    out = model.generator_loss(x, rec, q, step=10**6)
    torch.testing.assert_close(out.loss, ((rec - x) ** 2).mean() + q.loss)
    assert model.discriminator_loss(x, rec.detach(), 10**6) is None
    assert model.discriminator_parameters() == []


def test_patchgan_init_and_hinge() -> None:
    torch.manual_seed(0)
    disc = NLayerDiscriminator(ndf=64, n_layers=3, norm="batch")
    convs = [m for m in disc.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 5  # first, 2 stride-2, 1 stride-1, output
    big = convs[2].weight.detach()  # 128→256, 4×4: half a million weights
    assert abs(float(big.std()) - 0.02) < 1e-3 and abs(float(big.mean())) < 1e-3
    bn = [m for m in disc.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(abs(float(m.weight.detach().mean()) - 1.0) < 0.01 and float(m.bias.detach().abs().max()) == 0
               for m in bn)
    # 70×70 PatchGAN on 64×64: (64/8 − 2) patches per side
    assert disc(torch.zeros(1, 3, 64, 64)).shape == (1, 1, 6, 6)
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    # ½(mean(relu(1−r)) + mean(relu(1+f))) = ½((0 + 0.5)/2 + (0 + 1)/2)
    assert float(hinge_d_loss(real, fake)) == pytest.approx(0.375)


def test_actnorm_initialises_from_first_batch() -> None:
    norm = ActNorm(4)
    x = torch.randn(8, 4, 5, 5) * torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1, 1) + 5.0
    y = norm(x)
    torch.testing.assert_close(y.mean((0, 2, 3)), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.std((0, 2, 3)), torch.ones(4), atol=1e-4, rtol=0)
    assert bool(norm.initialized)
    scale = norm.scale.detach().clone()
    norm(x * 10)  # later batches do not re-initialise
    assert torch.equal(norm.scale.detach(), scale)
    disc = NLayerDiscriminator(ndf=8, n_layers=2, norm="act")
    disc(images(4)).mean().backward()
    assert all(p.grad is not None for p in disc.parameters())


# ---------------------------------------------------------------------------------------
# Configuration: gin, quantizer choice, rebuilding
# ---------------------------------------------------------------------------------------


def _parse(files: list[str], bindings: list[str] = ()) -> None:
    lgvq_plugins.list_backbones()  # plugins (and their configurables) before parsing
    gin.add_config_file_search_path(str(bundled_gin_dir()))
    gin.parse_config_files_and_bindings([str(resolve_gin_file(f)) for f in files], list(bindings))


@pytest.mark.parametrize("block,backbone,quantizer", [
    ("backbones/vqvae_backbone.gin", "vqvae", "vq"),
    ("backbones/vqgan_backbone.gin", "vqgan", "vq"),
    ("backbones/cvq_backbone.gin", "vqgan", "cvq"),
])
def test_gin_blocks_build_quick_start(block: str, backbone: str, quantizer: str) -> None:
    if quantizer not in QUANTIZERS:
        pytest.skip(f"quantizer {quantizer!r} is not registered")
    _parse([block])
    model = lgvq_plugins.create_backbone(backbone)
    gin.clear_config()
    assert model.config["quantizer"] == quantizer
    assert model.grid(64) == (16, 16)
    assert model.quantizer.num_codes == 1024 and model.embed_dim == 64
    rebuilt = lgvq_plugins.create_backbone(backbone, **model.config)  # without the gin bindings
    assert rebuilt.config == model.config
    assert rebuilt.load_state_dict(model.state_dict()).missing_keys == []


@pytest.mark.requires_vqtorch
def test_config_records_gin_bindings() -> None:
    _parse([], ["vqgan.ch = 8", "vqgan.ch_mult = (1, 2)", "vqgan.num_res_blocks = 0",
                "vqgan.attn_resolutions = ()", "vqgan.quantizer = 'vqtorch_vq'",
                "vqgan.quantizer_config = {'num_codes': 16}", "vqgan.embed_dim = 8",
                "vqgan.z_channels = 8", "vqgan.disc_weight = 0.3",
                "lgvq.quantizer.vqtorch_vq.decay = 0.5"])
    model = lgvq_plugins.create_backbone("vqgan")
    assert model.config["ch"] == 8 and model.config["ch_mult"] == [1, 2]
    assert model.config["disc_weight"] == 0.3 and model.disc_weight == 0.3
    assert model.config["quantizer_config"]["decay"] == 0.5
    assert model.config["quantizer_config"]["num_codes"] == 16
    assert model.quantizer.config["decay"] == 0.5
    gin.clear_config()
    rebuilt = lgvq_plugins.create_backbone("vqgan", **model.config)
    assert rebuilt.quantizer.config["decay"] == 0.5 and rebuilt.encoder.conv_in.out_channels == 8


class _ConfiglessQuantizer(nn.Module):
    """A quantizer without a ``config`` attribute (delegates to ``vqtorch_vq``)."""

    def __init__(self, dim: int, num_codes: int = 8, decay: float = 0.8):
        super().__init__()
        self.dim, self.num_codes = dim, num_codes
        self.inner = lgvq_plugins.create_quantizer("vqtorch_vq", dim=dim, num_codes=num_codes, decay=decay)

    @property
    def codebook(self) -> torch.Tensor:
        return self.inner.codebook

    def forward(self, z: torch.Tensor) -> Quantized:
        return self.inner(z)

    def embed(self, indices: torch.Tensor) -> torch.Tensor:
        return self.inner.embed(indices)


@pytest.mark.requires_vqtorch
def test_config_of_a_quantizer_without_config_comes_from_gin() -> None:
    lgvq_plugins.register_quantizer("configless_test_q")(_ConfiglessQuantizer)
    try:
        _parse([], ["configless_test_q.decay = 0.5"])
        model = make("vqvae", "configless_test_q", quantizer_config={"num_codes": 4})
        gin.clear_config()
        # gin's bindings for it are recorded together with the explicit settings
        assert model.config["quantizer_config"] == {"decay": 0.5, "num_codes": 4}
        rebuilt = lgvq_plugins.create_backbone("vqvae", **model.config)
        assert rebuilt.quantizer.inner.config["decay"] == 0.5 and rebuilt.quantizer.num_codes == 4
    finally:
        lgvq_plugins.registry("quantizer").remove("configless_test_q")


@pytest.mark.requires_vqtorch
def test_quantizer_factory_and_errors() -> None:
    factory = lgvq_plugins.registry("quantizer").get("vqtorch_vq")
    kwargs = tiny_kwargs("vqvae", "vqtorch_vq")
    model = lgvq_plugins.create_backbone("vqvae", **{**kwargs, "quantizer": factory})
    assert model.config["quantizer"] == "vqtorch_vq"
    with pytest.raises(lgvq_plugins.UnknownComponentError, match="Registered quantizers"):
        lgvq_plugins.create_backbone("vqvae", **{**kwargs, "quantizer": "no_such_q"})
    # an import path rebuilds a quantizer that is not registered under a name
    path = f"{_ConfiglessQuantizer.__module__}:{_ConfiglessQuantizer.__qualname__}"
    model = lgvq_plugins.create_backbone("vqvae", **{**kwargs, "quantizer": path, "quantizer_config": {}})
    assert model.config["quantizer"] == path and isinstance(model.quantizer, _ConfiglessQuantizer)
    model = lgvq_plugins.create_backbone("vqvae", **{**kwargs, "quantizer": _ConfiglessQuantizer,
                                                     "quantizer_config": {"num_codes": 4}})
    # every argument is recorded, defaults included, so a reload does not depend on them
    assert model.config["quantizer"] == path
    assert model.config["quantizer_config"] == {"num_codes": 4, "decay": 0.8}
    assert lgvq_plugins.create_backbone("vqvae", **model.config).quantizer.num_codes == 4

    class Local(_ConfiglessQuantizer):
        pass

    with pytest.raises(ValueError, match="register it"):
        lgvq_plugins.create_backbone("vqvae", **{**kwargs, "quantizer": Local})
    with pytest.raises(ValueError, match="embed_dim"):
        make("vqvae", "vqtorch_vq", quantizer_config={"dim": 3})
    model = make("vqvae", "vqtorch_vq")
    with pytest.raises(ValueError, match="downsampling factor 2"):
        model.encode(images(size=(31, 32)))


# ---------------------------------------------------------------------------------------
# A backbone registered in code is picked up like a built-in
# ---------------------------------------------------------------------------------------


@pytest.mark.requires_vqtorch
def test_registered_backbone_is_picked_up() -> None:
    class TinyAE(VQTokenizer):
        def __init__(self, quantizer: str = "vqtorch_vq", quantizer_config: dict | None = None,
                     embed_dim: int = 8):
            args = dict(locals())
            super().__init__(quantizer=quantizer, quantizer_config=quantizer_config, embed_dim=embed_dim,
                             z_channels=8, ch=8, ch_mult=(1, 2), num_res_blocks=0, resolution=SIZE,
                             attn_resolutions=(), mid_attn=False, dropout=0.0)
            self._finish_config(args)

        def generator_loss(self, x, reconstruction, quantized, step):
            loss = (x - reconstruction).pow(2).mean() + quantized.loss
            return LossOutput(loss, {"rec": loss.detach()})

    lgvq_plugins.register_backbone("tiny_test_ae")(TinyAE)
    try:
        assert "tiny_test_ae" in lgvq_plugins.list_backbones()
        _parse([], ["tiny_test_ae.embed_dim = 4"])
        model = lgvq_plugins.create_backbone("tiny_test_ae", quantizer_config={"num_codes": 8})
        gin.clear_config()
        assert model.embed_dim == 4 and model.config["embed_dim"] == 4
        check_contract(model, "tiny_test_ae", images())
        assert model.discriminator_loss(images(), images(), 0) is None
    finally:
        lgvq_plugins.registry("backbone").remove("tiny_test_ae")
    assert "tiny_test_ae" not in lgvq_plugins.list_backbones()


# ---------------------------------------------------------------------------------------
# Perceptual losses
# ---------------------------------------------------------------------------------------


def _offline_hub(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """An empty hub cache and a download that fails as it does without network."""
    import torchvision.models._api as tv_api

    def no_network(url: str, *args: Any, **kwargs: Any) -> Any:
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    monkeypatch.setattr(tv_api, "load_state_dict_from_url", no_network)


@pytest.mark.requires_vqtorch
def test_lpips_without_weights_raises_a_clear_error(monkeypatch, tmp_path) -> None:
    _offline_hub(monkeypatch, tmp_path)
    with pytest.raises(PerceptualWeightsError) as info:
        make("vqgan", "vqtorch_vq", perceptual="lpips")
    message = str(info.value)
    assert "vgg16" in message and "lpips.backbone_weights" in message
    assert str(tmp_path / "hub" / "checkpoints" / "vgg16-397923af.pth") in message
    assert "vqgan.perceptual = 'none'" in message
    with pytest.raises(PerceptualWeightsError, match="is not a file"):
        LPIPS("alex", backbone_weights=str(tmp_path / "missing.pth"))
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "partial.pth")
    with pytest.raises(PerceptualWeightsError, match="lacks"):
        LPIPS("alex", backbone_weights=str(tmp_path / "partial.pth"))


@pytest.mark.requires_vqtorch
def test_lpips_with_local_backbone_weights(tmp_path) -> None:
    import torchvision

    torch.manual_seed(0)
    features = torchvision.models.alexnet().features.state_dict()  # random "ImageNet" weights
    path = tmp_path / "alexnet-features.pth"
    torch.save(features, path)
    lpips = LPIPS("alex", backbone_weights=str(path))
    torch.testing.assert_close(lpips.lpips.net.slice2.state_dict()["3.weight"], features["3.weight"])
    x = images(2)
    y = (x + 0.5 * torch.randn_like(x)).clamp(-1, 1).requires_grad_()
    d = lpips(x, y)
    assert d.shape == (2,) and (d > 0).all()
    torch.testing.assert_close(lpips(x, x), torch.zeros(2))
    d.sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in lpips.parameters())

    model = make("vqgan", "vqtorch_vq", perceptual="lpips", perceptual_weight=0.5,
                 perceptual_config={"net": "alex", "backbone_weights": str(path)})
    xb = images(2, size=64)
    rec, q = model(xb)
    out = model.generator_loss(xb, rec, q, step=0)
    expected = (xb - rec).abs().mean() + 0.5 * model.perceptual_loss(xb, rec).mean()
    torch.testing.assert_close(out.logs["rec"], expected.detach())
    assert float(out.logs["perceptual"]) > 0
    # the frozen loss network is not part of the tokenizer's weights
    assert not any(k.startswith("perceptual_loss.") for k in model.state_dict())
    rebuilt = lgvq_plugins.create_backbone("vqgan", **model.config)
    assert rebuilt.load_state_dict(model.state_dict()).missing_keys == []


def test_lpips_from_prepopulated_hub_cache(monkeypatch, tmp_path) -> None:
    import torchvision

    _offline_hub(monkeypatch, tmp_path)
    import torchvision.models._api as tv_api
    from torch.hub import load_state_dict_from_url

    # the cache is consulted before any download, so the real loader finds the file
    monkeypatch.setattr(tv_api, "load_state_dict_from_url", load_state_dict_from_url)
    torch.manual_seed(0)
    state = torchvision.models.squeezenet1_1().state_dict()
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(state, tmp_path / "hub" / "checkpoints" / "squeezenet1_1-b8a52dc0.pth")
    lpips = LPIPS("squeeze")
    torch.testing.assert_close(lpips.lpips.net.slices[1].state_dict()["3.squeeze.weight"],
                               state["features.3.squeeze.weight"])
    a, b = images(1), images(1, seed=2)
    assert float(lpips(a, b)) > 0
    # the same file given as a local path (whole-model state dict) gives the same network
    local = LPIPS("squeeze", backbone_weights=str(tmp_path / "hub" / "checkpoints" / "squeezenet1_1-b8a52dc0.pth"))
    torch.testing.assert_close(local(a, b), lpips(a, b))


def test_none_perceptual_is_registered() -> None:
    none = lgvq_plugins.create_perceptual_loss("none")
    assert torch.equal(none(images(3), images(3, seed=5)), torch.zeros(3))
    assert {"lpips", "none"} <= set(lgvq_plugins.list_perceptual_losses())
    assert not {"lpips", "none"} & set(lgvq_plugins.list_metrics())  # losses are not metrics
