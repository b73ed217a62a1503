"""Registries: decorator registration, create/list, unknown and duplicate names, gin."""

from __future__ import annotations

import gin
import pytest
import torch

import lgvq_plugins
from gin import config as gin_config

from lgvq_plugins.registry import (DuplicateComponentError, Origin, Registry, UnknownComponentError,
                                   gin_selector, plural)


class _Toy:
    def __init__(self, width: int = 3, depth: int = 1):
        self.width, self.depth = width, depth


def test_registry_add_create_and_glob():
    reg = Registry("metric")
    reg.add("alpha_one", _Toy, source="t")
    reg.add("alpha_two", lambda scale=2: scale * 10, source="t")
    reg.add("beta", _Toy, source="t", exist_ok=True)
    assert reg.names() == ["alpha_one", "alpha_two", "beta"]
    assert reg.names("alpha_*") == ["alpha_one", "alpha_two"]
    toy = reg.create("alpha_one", width=7, depth=None)  # None is dropped, default kept
    assert (toy.width, toy.depth) == (7, 1)
    assert toy.lgvq_registry_name == "alpha_one"
    assert reg.create("alpha_two", scale=3) == 30


def test_unknown_name_lists_valid_names_and_close_matches():
    reg = Registry("metric")
    for name in ("psnr_score", "codebook_usage", "perplexity"):
        reg.add(name, _Toy, source="t")
    with pytest.raises(UnknownComponentError) as err:
        reg.create("psnr_scor")
    message = str(err.value)
    assert "Did you mean 'psnr_score'" in message
    assert "codebook_usage, perplexity, psnr_score" in message


def test_duplicate_name_names_both_registrants():
    reg = Registry("metric")
    reg.add("dup_metric", _Toy, source="plugin 'first'")

    class Other:
        pass

    with pytest.raises(DuplicateComponentError, match="plugin 'first'.*plugin 'second'"):
        reg.add("dup_metric", Other, source="plugin 'second'")
    reg.add("dup_metric", Other, source="plugin 'second'", exist_ok=True)
    assert isinstance(reg.create("dup_metric"), Other)


def test_names_must_be_identifiers():
    with pytest.raises(ValueError, match="identifier"):
        Registry("metric").add("not-valid", _Toy)


def test_decorator_registration_is_one_line_and_gin_configurable(fresh_plugins):
    @lgvq_plugins.register_backbone("toy_backbone_for_test")
    class ToyBackbone(torch.nn.Module):
        def __init__(self, embed_dim: int = 4, scale: float = 1.0):
            super().__init__()
            self.proj = torch.nn.Linear(embed_dim, embed_dim)
            self.scale = scale

    try:
        assert "toy_backbone_for_test" in lgvq_plugins.list_backbones("toy_*")
        gin.parse_config(["toy_backbone_for_test.embed_dim = 6", "toy_backbone_for_test.scale = 0.5"])
        model = lgvq_plugins.create_backbone("toy_backbone_for_test")
        assert model.proj.in_features == 6 and model.scale == 0.5
        # explicit keyword arguments win over gin bindings
        assert lgvq_plugins.create_backbone("toy_backbone_for_test", scale=2.0).scale == 2.0
        # the decorator returns the configurable, so direct calls see gin too
        assert ToyBackbone().proj.in_features == 6
        listing = {i.name: i for i in lgvq_plugins.plugin_infos()}
        assert "toy_backbone_for_test" in listing["<registered in code>"].registered["backbone"]
    finally:
        lgvq_plugins.registry("backbone").remove("toy_backbone_for_test")


def test_every_kind_has_register_create_list():
    for kind in lgvq_plugins.KINDS:
        assert callable(getattr(lgvq_plugins, f"register_{kind}"))
        assert callable(getattr(lgvq_plugins, f"create_{kind}"))
        assert callable(getattr(lgvq_plugins, f"list_{plural(kind)}"))
    assert (plural("alignment_loss"), plural("perceptual_loss"), plural("quantizer")) == (
        "alignment_losses", "perceptual_losses", "quantizers")


def test_gin_reference_to_registered_component(fresh_plugins):
    @gin.configurable
    def holder_for_test(component=gin.REQUIRED):
        return component

    @lgvq_plugins.register_metric("scaled_for_test")
    def scaled(x: float = 1.0, factor: float = 2.0):
        return x * factor

    try:
        gin.parse_config(["holder_for_test.component = @scaled_for_test()",
                          "scaled_for_test.x = 5.0", "lgvq.metric.scaled_for_test.factor = 3.0"])
        assert holder_for_test() == 15.0
    finally:
        lgvq_plugins.registry("metric").remove("scaled_for_test")


def test_unknown_name_message_uses_the_right_plural():
    reg = Registry("alignment_loss")
    reg.add("gsa_for_test", _Toy, source="t")
    with pytest.raises(UnknownComponentError, match="Registered alignment_losses: gsa_for_test"):
        reg.get("nope")


class _Builtin(_Toy):
    pass


class _Plugin(_Toy):
    pass


class _Code(_Toy):
    pass


def _in_gin(kind: str, name: str):
    return gin_config._REGISTRY[gin_selector(kind, name)].wrapped


def test_precedence_code_over_plugin_over_builtin_whatever_the_order():
    """The registration in effect has the highest (origin, exist_ok, order); gin's table
    always holds that one, and removing it brings back the one it replaced."""
    for order in ([("b", _Builtin, Origin.BUILTIN, False), ("p", _Plugin, Origin.PLUGIN, True),
                   ("c", _Code, Origin.CODE, True)],
                  [("c", _Code, Origin.CODE, True), ("p", _Plugin, Origin.PLUGIN, True),
                   ("b", _Builtin, Origin.BUILTIN, False)]):
        reg = Registry("metric")
        for owner, factory, origin, exist_ok in order:
            reg.add("prec_test", factory, source=owner, origin=origin, exist_ok=exist_ok, owner=owner)
        assert reg.entry("prec_test").original is _Code and _in_gin("metric", "prec_test") is _Code
        assert [e.source for e in reg.entries("prec_test")] == [o[0] for o in order]
        reg.remove("prec_test")  # the code registration goes: the plugin's override is back
        assert reg.entry("prec_test").original is _Plugin and _in_gin("metric", "prec_test") is _Plugin
        reg.remove_owner("p")
        assert reg.entry("prec_test").original is _Builtin and _in_gin("metric", "prec_test") is _Builtin
        reg.remove("prec_test")
        assert "prec_test" not in reg
        assert gin_selector("metric", "prec_test") not in gin_config._REGISTRY


def test_exist_ok_rules():
    reg = Registry("metric")
    reg.add("rules_test", _Builtin, source="built-in", origin=Origin.BUILTIN)
    # a plugin without exist_ok may not take a built-in's name ...
    with pytest.raises(DuplicateComponentError, match="by built-in and by plugin"):
        reg.add("rules_test", _Plugin, source="plugin", origin=Origin.PLUGIN)
    # ... with it, it may, and a later plugin that only wants to share the name is refused,
    reg.add("rules_test", _Plugin, source="plugin", origin=Origin.PLUGIN, exist_ok=True, owner="p")
    with pytest.raises(DuplicateComponentError):
        reg.add("rules_test", _Toy, source="other plugin", origin=Origin.PLUGIN, owner="q")
    # while a lower-ranked registration under an exist_ok override is kept underneath
    reg2 = Registry("metric")
    reg2.add("rules_test2", _Code, source="code", origin=Origin.CODE, exist_ok=True)
    reg2.add("rules_test2", _Builtin, source="built-in", origin=Origin.BUILTIN)
    assert reg2.entry("rules_test2").original is _Code
    # among exist_ok registrations of equal origin the later one wins
    reg.add("rules_test", _Toy, source="later plugin", origin=Origin.PLUGIN, exist_ok=True, owner="r")
    assert reg.entry("rules_test").original is _Toy
    reg.remove_owner("r")
    assert reg.entry("rules_test").original is _Plugin
    reg.clear()
    reg2.clear()
