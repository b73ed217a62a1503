"""Registries: decorator registration, create/list, unknown and duplicate names, gin."""

from __future__ import annotations

import gin
import pytest
import torch

import lgvq_plugins
from lgvq_plugins.registry import DuplicateComponentError, Registry, UnknownComponentError


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
        plural = "alignment_losses" if kind == "alignment_loss" else f"{kind}s"
        assert callable(getattr(lgvq_plugins, f"register_{kind}"))
        assert callable(getattr(lgvq_plugins, f"create_{kind}"))
        assert callable(getattr(lgvq_plugins, f"list_{plural}"))


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
