"""Contracts checked where they are used: ``check_implements`` lists every missing member at
once; ``LanguageGuided``, ``Trainer`` and ``save_pretrained`` check their tokenizer when
built; every registered backbone and quantizer meets its contract; ``GuidedOutput.extras``
is namespaced per loss and L_mtp's speed-up reads documented fields."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch
from fakes import CAPTIONS, FakeTextEncoder, FakeTokenizer
from torch import nn

import lgvq_plugins
from lgvq_plugins.contracts import (
    ContractError,
    check_implements,
    missing_members,
    protocol_members,
)
from lgvq_plugins.guidance import LanguageGuided
from lgvq_plugins.interfaces import (
    GuidableTokenizer,
    GuidedOutput,
    Quantizer,
    SavableTokenizer,
    TextEncoder,
    Tokenizer,
)
from lgvq_plugins.pretrained import save_pretrained
from lgvq_plugins.training.trainer import Trainer

SMALL = {"width": 32, "heads": 4}


def _images(b: int = 4, size: int = 16) -> torch.Tensor:
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1


class OnlyForward(nn.Module):
    """Runs like a tokenizer (forward → (rec, Quantized)) but has nothing else."""

    def __init__(self):
        super().__init__()
        self.inner = FakeTokenizer()

    def forward(self, x):
        return self.inner(x)


class NoForward(nn.Module):
    """An nn.Module without forward: it has ``__call__`` but calling it fails."""

    embed_dim = 8

    def grid(self, image_size):
        return 4, 4


# ---------------------------------------------------------------------------------------
# check_implements
# ---------------------------------------------------------------------------------------


def test_protocol_members_follow_the_declarations():
    assert list(protocol_members(GuidableTokenizer)) == ["embed_dim", "grid", "__call__"]
    tok = list(protocol_members(Tokenizer))
    assert tok[:3] == ["embed_dim", "grid", "__call__"]  # base protocol's first
    assert set(tok) == {"embed_dim", "grid", "__call__", "quantizer", "config", "encode", "decode",
                        "decode_indices", "generator_loss", "discriminator_loss", "discriminator_parameters"}
    assert list(protocol_members(SavableTokenizer))[-1] == "lgvq_registry_name"
    assert set(protocol_members(Quantizer)) == {"num_codes", "dim", "codebook", "__call__", "embed"}
    assert protocol_members(Tokenizer)["quantizer"].protocol is Quantizer  # checked inside
    # every member says what it is for (docstring or the Attributes: section)
    for proto in (SavableTokenizer, Quantizer, TextEncoder):
        undocumented = [m.name for m in protocol_members(proto).values() if not m.doc]
        assert undocumented == [], (proto.__name__, undocumented)


def test_one_error_lists_every_missing_member_with_its_purpose():
    with pytest.raises(ContractError) as info:
        check_implements(OnlyForward(), Tokenizer, role="Trainer(model=...).tokenizer")
    err = info.value
    assert err.missing == ["embed_dim", "grid", "quantizer", "config", "encode", "decode", "decode_indices",
                           "generator_loss", "discriminator_loss", "discriminator_parameters"]
    message = str(err)
    assert message.startswith("Trainer(model=...).tokenizer: ") and "OnlyForward" in message
    assert "lacks 10 member(s)" in message and "lgvq_plugins.interfaces.Tokenizer" in message
    # signature and purpose, from the protocol's docstrings
    assert "generator_loss(x, reconstruction, quantized, step): missing — Reconstruction" in message
    assert "embed_dim: missing — D, the channel width" in message
    assert "docs/architecture.md" in message and "``" not in message


def test_nested_contracts_wrong_kinds_and_forwardless_modules():
    tokenizer = FakeTokenizer()
    assert missing_members(tokenizer, SavableTokenizer)[0][0] == "lgvq_registry_name"
    tokenizer.lgvq_registry_name = "fake"
    assert check_implements(tokenizer, SavableTokenizer, role="x") is tokenizer

    tokenizer.quantizer = nn.Linear(8, 8)  # has forward, lacks the codebook side
    tokenizer.grid = 4  # an old-style attribute where a method is expected
    with pytest.raises(ContractError) as info:
        check_implements(tokenizer, Tokenizer, role="x")
    assert info.value.missing == ["grid", "quantizer.num_codes", "quantizer.dim", "quantizer.codebook",
                                  "quantizer.embed"]
    assert "grid(image_size): is a int, expected a method" in str(info.value)

    with pytest.raises(ContractError) as info:
        check_implements(NoForward(), GuidableTokenizer, role="x")
    assert info.value.missing == ["__call__"]
    assert "__call__/forward(x): missing (an nn.Module needs forward())" in str(info.value)


def test_a_property_that_raises_counts_as_missing():
    class Broken(nn.Module):
        num_codes, dim = 4, 2

        @property
        def codebook(self):
            raise RuntimeError("not built yet")

        def forward(self, z):
            return z

        def embed(self, indices):
            return indices

    with pytest.raises(ContractError, match="reading it raised RuntimeError: not built yet") as info:
        check_implements(Broken(), Quantizer, role="x")
    assert info.value.missing == ["codebook"]


def test_only_protocols_are_accepted():
    with pytest.raises(TypeError, match="not a typing.Protocol"):
        protocol_members(GuidedOutput)


# ---------------------------------------------------------------------------------------
# Checked where used
# ---------------------------------------------------------------------------------------


def test_language_guided_checks_its_tokenizer_and_text_encoder_when_built():
    with pytest.raises(ContractError) as info:
        LanguageGuided(OnlyForward(), FakeTextEncoder(), **SMALL)
    assert info.value.missing == ["embed_dim", "grid"]
    assert str(info.value).startswith("LanguageGuided(tokenizer=...): ")

    encoder = FakeTextEncoder()
    del encoder.identity  # the feature cache's key prefix
    with pytest.raises(ContractError, match=r"LanguageGuided\(text_encoder=...\)") as info:
        LanguageGuided(FakeTokenizer(), encoder, **SMALL)
    assert info.value.missing == ["identity"]

    # a guidable tokenizer is enough for guiding in one's own loop
    class Guidable(OnlyForward):
        embed_dim = 8

        def grid(self, image_size):
            return self.inner.grid(image_size)

    model = LanguageGuided(Guidable(), FakeTextEncoder(), image_size=16, **SMALL)
    out = model(_images(), CAPTIONS)
    assert set(out.raw_losses) == {"gsa", "mtp", "ras"}


def test_trainer_checks_the_whole_tokenizer_contract(tmp_path):
    class Guidable(OnlyForward):
        embed_dim = 8

        def grid(self, image_size):
            return self.inner.grid(image_size)

    model = LanguageGuided(Guidable(), FakeTextEncoder(), image_size=16, **SMALL)
    with pytest.raises(ContractError) as info:
        Trainer(model, [], out_dir=tmp_path, progress=False, tensorboard=False)
    assert str(info.value).startswith("Trainer(model=...).tokenizer: ")
    assert info.value.missing == ["quantizer", "config", "encode", "decode", "decode_indices",
                                  "generator_loss", "discriminator_loss", "discriminator_parameters"]
    assert not (tmp_path / "logs").exists()  # refused before anything was set up


def test_save_pretrained_checks_before_writing(tmp_path):
    model = LanguageGuided(FakeTokenizer(), FakeTextEncoder(), **SMALL)  # not built by a registry
    with pytest.raises(ContractError, match="lgvq_registry_name: missing — the backbone registry name") as info:
        save_pretrained(model, tmp_path / "out")
    assert info.value.missing == ["lgvq_registry_name"]
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------
# Every registered component meets its contract (a newly registered one is tested too)
# ---------------------------------------------------------------------------------------


def _accepted(factory: Any, wanted: dict[str, Any]) -> dict[str, Any]:
    params = inspect.signature(factory).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return wanted
    return {k: v for k, v in wanted.items() if k in params}


@pytest.mark.parametrize("name", lgvq_plugins.list_backbones())
def test_registered_backbones_are_savable_tokenizers(name):
    factory = lgvq_plugins.registry("backbone").entry(name).original
    tiny = {"quantizer": "vq", "quantizer_config": {"num_codes": 16}, "embed_dim": 8, "z_channels": 8,
            "ch": 8, "ch_mult": (1, 2), "num_res_blocks": 1, "resolution": 16, "attn_resolutions": (),
            "disc_ndf": 8, "disc_n_layers": 1}
    model = lgvq_plugins.create_backbone(name, **_accepted(factory, tiny))
    check_implements(model, SavableTokenizer, role=f"backbone {name!r}")


@pytest.mark.parametrize("name", lgvq_plugins.list_quantizers())
def test_registered_quantizers_meet_the_contract(name):
    factory = lgvq_plugins.registry("quantizer").entry(name).original
    quantizer = lgvq_plugins.create_quantizer(name, dim=8, **_accepted(factory, {"num_codes": 16}))
    check_implements(quantizer, Quantizer, role=f"quantizer {name!r}")


# ---------------------------------------------------------------------------------------
# GuidedOutput.extras: namespaced per loss; shared data are fields
# ---------------------------------------------------------------------------------------


def test_extras_hold_only_each_losss_own_key():
    torch.manual_seed(0)
    model = LanguageGuided(FakeTokenizer(), FakeTextEncoder(), **SMALL).train()
    out = model(_images(), CAPTIONS)
    assert set(out.extras) == {"mtp", "ras"}  # gsa records nothing; no shared speed-up key
    assert out.visual_states is not None and out.visual_proj is model.code_text.proj_out
    torch.testing.assert_close(out.visual_proj(out.visual_states), out.visual_tokens)

    class Leaky(nn.Module):
        def forward(self, guided, batch):
            guided.extras["shared"] = 1
            return guided.visual_tokens.sum() * 0

    model.alignment_losses["leaky"] = Leaky()
    model.weights["leaky"] = 1.0
    with pytest.raises(ValueError, match=r"alignment loss 'leaky' wrote GuidedOutput.extras keys \['shared'\]"):
        model(_images(), CAPTIONS)


def test_mtp_factored_path_equals_the_plain_one():
    torch.manual_seed(0)
    # code-text width 16 < text width 32: the factored path is really taken
    model = LanguageGuided(FakeTokenizer(), FakeTextEncoder(), losses={"mtp": 1.0}, width=16, heads=4).eval()
    mtp = model.alignment_losses["mtp"]
    with torch.no_grad():
        out = model(_images(), CAPTIONS)
        assert out.visual_states.shape[-1] != out.visual_tokens.shape[-1]  # 16 vs 32
        maps = []
        predict = mtp.predict
        mtp.predict = lambda *args, **kw: maps.append(kw.get("visual_map")) or predict(*args, **kw)
        torch.manual_seed(1)  # the same mask for both paths
        factored = mtp(out, {})
        factored_logits = out.extras["mtp"]["logits"]
        plain = GuidedOutput(out.reconstruction, out.quantized, text=out.text, visual_tokens=out.visual_tokens)
        torch.manual_seed(1)
        reference = mtp(plain, {})
    assert maps == [model.code_text.proj_out, None]  # the documented fields select the cheap path
    torch.testing.assert_close(plain.extras["mtp"]["logits"], factored_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(reference, factored, rtol=1e-4, atol=1e-5)


def test_alignment_losses_are_checked_when_guidance_is_built():
    from lgvq_plugins.hookspecs import hookimpl

    class NoSetup(nn.Module):  # forgot setup(guide): it would never size its layers
        def forward(self, guided, batch):
            return guided.visual_tokens.sum() * 0

    class Plugin:
        @staticmethod
        @hookimpl
        def register_alignment_losses(register):
            register("no_setup", NoSetup)

    host = lgvq_plugins.get_host()
    name = host.register_plugin(Plugin, name="tests.contracts.no_setup")
    try:
        with pytest.raises(ContractError, match=r"^alignment loss 'no_setup': ") as info:
            LanguageGuided(FakeTokenizer(), FakeTextEncoder(), losses={"no_setup": 1.0}, **SMALL)
    finally:
        host.unregister_plugin(name)
    assert info.value.missing == ["setup"]
    assert "Called once by `LanguageGuided`" in str(info.value)
