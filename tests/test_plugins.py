"""Plugin discovery through real entry points: a third-party distribution is found, listed
and created from gin; broken ones are contained (or fatal in strict mode); LGVQ_PLUGINS
limits which load; every hook is documented."""

from __future__ import annotations

import importlib.metadata as metadata
import inspect
import sys
import textwrap
import warnings
from pathlib import Path

import gin
import pytest
import torch

import lgvq_plugins
from lgvq_plugins import hookspecs
from lgvq_plugins.plugins import HOOK_KINDS, PluginLoadError, PluginWarning

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "lgvq-vqtorch"


def _make_distribution(root: Path, dist: str, entry_points: dict[str, str],
                       modules: dict[str, str]) -> None:
    """Write an installed-looking distribution: modules plus a ``.dist-info`` folder whose
    ``entry_points.txt`` declares plugins in the ``lgvq_plugins`` group."""
    info = root / f"{dist.replace('-', '_')}-0.3.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.3.1\n")
    lines = "\n".join(f"{name} = {target}" for name, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[lgvq_plugins]\n{lines}\n")
    for name, source in modules.items():
        (root / f"{name}.py").write_text(textwrap.dedent(source))


GOOD = """
    from lgvq_plugins.hookspecs import hookimpl

    class Doubler:
        def __init__(self, factor: int = 2):
            self.factor = factor

    @hookimpl
    def register_metrics(register):
        register("tp_doubler", Doubler)
"""
IMPORT_FAILS = """
    raise ImportError("this plugin needs a package that is not installed")
"""
REGISTER_FAILS = """
    from lgvq_plugins.hookspecs import hookimpl

    class Half:
        pass

    @hookimpl
    def register_metrics(register):
        register("tp_half_registered", Half)
        raise RuntimeError("boom while registering")
"""


@pytest.fixture
def third_party(tmp_path, monkeypatch, fresh_plugins):
    _make_distribution(tmp_path, "tp-good", {"tp_good": "tp_good_mod"}, {"tp_good_mod": GOOD})
    _make_distribution(tmp_path, "tp-broken", {"tp_import_fails": "tp_import_fails_mod",
                                               "tp_register_fails": "tp_register_fails_mod"},
                       {"tp_import_fails_mod": IMPORT_FAILS, "tp_register_fails_mod": REGISTER_FAILS})
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("LGVQ_STRICT_PLUGINS", raising=False)
    monkeypatch.delenv("LGVQ_PLUGINS", raising=False)
    monkeypatch.delenv("LGVQ_DISABLE_ENTRYPOINTS", raising=False)
    yield fresh_plugins
    for mod in ("tp_good_mod", "tp_import_fails_mod", "tp_register_fails_mod"):
        sys.modules.pop(mod, None)


def test_third_party_plugin_discovered_listed_and_created_from_gin(third_party, tmp_path):
    with pytest.warns(PluginWarning):
        names = lgvq_plugins.list_metrics("tp_*")
    assert "tp_doubler" in names
    infos = {i.name: i for i in lgvq_plugins.plugin_infos()}
    good = infos["tp_good"]
    assert (good.distribution, good.version, good.builtin) == ("tp-good", "0.3.1", False)
    assert good.hooks == ["register_metrics"] and good.registered == {"metric": ["tp_doubler"]}
    config = tmp_path / "tp.gin"
    config.write_text("tp_doubler.factor = 5\n")
    from lgvq_plugins.config import parse_gin

    parse_gin([config])
    assert lgvq_plugins.create_metric("tp_doubler").factor == 5


def test_broken_plugins_warn_with_name_and_distribution_and_the_rest_work(third_party):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lgvq_plugins.get_host()
    messages = [str(w.message) for w in caught if issubclass(w.category, PluginWarning)]
    assert any("'tp_import_fails'" in m and "'tp-broken'" in m and "imported" in m for m in messages)
    assert any("'tp_register_fails'" in m and "'tp-broken'" in m and "boom" in m for m in messages)
    # what the broken plugin registered before failing was taken back; the good one works
    assert "tp_half_registered" not in lgvq_plugins.list_metrics()
    assert "tp_doubler" in lgvq_plugins.list_metrics()
    infos = {i.name: i for i in lgvq_plugins.plugin_infos()}
    assert infos["tp_register_fails"].error and infos["tp_import_fails"].error


def test_strict_mode_makes_a_broken_plugin_an_error(third_party, monkeypatch):
    monkeypatch.setenv("LGVQ_STRICT_PLUGINS", "1")
    with pytest.raises(PluginLoadError, match="tp_import_fails.*tp-broken"):
        lgvq_plugins.get_host()


def test_allow_list_limits_third_party_plugins(third_party, monkeypatch):
    monkeypatch.setenv("LGVQ_PLUGINS", "tp_good")
    with warnings.catch_warnings():
        warnings.simplefilter("error", PluginWarning)  # the broken ones are not even imported
        host = lgvq_plugins.get_host()
    assert "tp_doubler" in host.registries["metric"]
    assert "tp_import_fails" not in host.infos
    assert any(i.builtin for i in host.infos.values())  # built-ins always load


def test_cli_lists_plugins(third_party, capsys):
    from lgvq_plugins.cli import main

    with pytest.warns(PluginWarning):
        main(["plugins"])
    out = capsys.readouterr().out
    assert "tp_good (tp-good 0.3.1)" in out
    assert "metric: tp_doubler" in out
    assert "FAILED" in out and "tp_import_fails" in out
    assert "(built-in" in out


def test_example_distribution_is_a_real_plugin(fresh_plugins, tmp_path, monkeypatch):
    """The example package under examples/ declares its entry point in its own
    pyproject.toml; installed (as the README's test command does) or not, it is found."""
    pytest.importorskip("vector_quantize_pytorch", reason="the example plugin wraps vector-quantize-pytorch "
                        "(pip install -e examples/lgvq-vqtorch, as .ci/run does)")
    try:
        dist = metadata.distribution("lgvq-vqtorch")
    except metadata.PackageNotFoundError:
        _make_distribution(tmp_path, "lgvq-vqtorch", {"vqtorch": "lgvq_vqtorch.plugin"}, {})
        monkeypatch.syspath_prepend(str(tmp_path))
        monkeypatch.syspath_prepend(str(EXAMPLE))
        dist = metadata.distribution("lgvq-vqtorch")
    assert any(ep.group == "lgvq_plugins" and ep.name == "vqtorch" for ep in dist.entry_points)
    assert 'vqtorch = "lgvq_vqtorch.plugin"' in (EXAMPLE / "pyproject.toml").read_text()
    lgvq_plugins.reset_plugins()
    assert {"vqtorch_vq", "vqtorch_fsq"} <= set(lgvq_plugins.list_quantizers("vqtorch_*"))
    info = {i.name: i for i in lgvq_plugins.plugin_infos()}["vqtorch"]
    assert info.distribution == "lgvq-vqtorch" and not info.builtin
    gin.parse_config(["vqtorch_vq.num_codes = 24"])
    quantizer = lgvq_plugins.create_quantizer("vqtorch_vq", dim=8)
    assert quantizer.num_codes == 24 and tuple(quantizer.codebook.shape) == (24, 8)


def test_in_process_plugin_registers_and_unregisters(fresh_plugins):
    class InProcess:
        @hookspecs.hookimpl
        def register_datasets(self, register):
            register("in_process_dataset", list)

    host = lgvq_plugins.get_host()
    name = host.register_plugin(InProcess(), name="in-process-test")
    try:
        assert lgvq_plugins.create_dataset("in_process_dataset") == []
    finally:
        host.unregister_plugin(name)
    assert "in_process_dataset" not in lgvq_plugins.list_datasets()


def test_every_hook_is_documented_and_maps_to_a_kind():
    specs = [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
             if name.startswith("register_")]
    assert sorted(specs) == sorted(HOOK_KINDS)
    assert set(HOOK_KINDS.values()) == set(lgvq_plugins.KINDS)
    docs = (REPO / "docs" / "plugins.md").read_text()
    for name in specs:
        assert getattr(hookspecs, name).__doc__, f"{name} has no docstring"
        assert f"`{name}`" in docs, f"{name} is not documented in docs/plugins.md"


# ---------------------------------------------------------------------------------------
# pluggy used as pluggy: ordering options, specname, check_pending, rollback, precedence
# ---------------------------------------------------------------------------------------

ORDER_LOG = """
    CALLS = []
"""
ORDERED = """
    from lgvq_plugins.hookspecs import hookimpl
    import tp_order_log

    class Mine:
        who = {who!r}

    @hookimpl({options})
    def {function}(register):
        tp_order_log.CALLS.append({who!r})
        register("tp_shared", Mine, exist_ok=True)
        register("tp_from_" + {who!r}, Mine)
"""


@pytest.fixture
def installs(tmp_path, monkeypatch, fresh_plugins):
    """``installs(dist, {entry_point: source})`` writes an installed-looking distribution
    whose plugins load at the next host access (nothing else third-party loads)."""
    modules: list[str] = []
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("LGVQ_PLUGINS", "")
    for var in ("LGVQ_STRICT_PLUGINS", "LGVQ_DISABLE_ENTRYPOINTS"):
        monkeypatch.delenv(var, raising=False)

    def install(dist: str, plugins: dict[str, str], extra: dict[str, str] | None = None) -> None:
        mods = {f"{ep}_mod": src for ep, src in plugins.items()} | dict(extra or {})
        _make_distribution(tmp_path / dist, dist, {ep: f"{ep}_mod" for ep in plugins}, mods)
        monkeypatch.syspath_prepend(str(tmp_path / dist))
        allowed = [p for p in __import__("os").environ["LGVQ_PLUGINS"].split(",") if p]
        monkeypatch.setenv("LGVQ_PLUGINS", ",".join(allowed + list(plugins)))
        modules.extend(mods)

    yield install
    for mod in modules:
        sys.modules.pop(mod, None)


def test_tryfirst_trylast_and_specname_are_honoured(installs):
    """Each hook is called through pluggy: tryfirst before, trylast after the others,
    whatever the registration order; specname lets another function name implement a
    hook. With exist_ok=True everywhere, the plugin called last has the final word."""
    log = {"tp_order_log": ORDER_LOG}
    installs("tp-last", {"tp_last": ORDERED.format(who="last", options="trylast=True",
                                                   function="register_metrics")}, log)
    installs("tp-middle", {"tp_middle": ORDERED.format(who="middle", options="specname='register_metrics'",
                                                       function="add_my_metrics")})
    installs("tp-first", {"tp_first": ORDERED.format(who="first", options="tryfirst=True",
                                                     function="register_metrics")})
    assert {"tp_from_first", "tp_from_middle", "tp_from_last"} <= set(lgvq_plugins.list_metrics("tp_*"))
    assert sys.modules["tp_order_log"].CALLS == ["first", "middle", "last"]
    assert lgvq_plugins.create_metric("tp_shared").who == "last"
    infos = {i.name: i for i in lgvq_plugins.plugin_infos()}
    assert infos["tp_middle"].hooks == ["register_metrics"]  # reported under the spec's name
    assert infos["tp_middle"].registered == {"metric": ["tp_shared", "tp_from_middle"]}


MISSPELLED = """
    from lgvq_plugins.hookspecs import hookimpl

    @hookimpl
    def register_quantizer(register):   # the hook is register_quantizers
        register("tp_never", dict)

    @hookimpl
    def register_metrics(register):
        register("tp_misspelled_metric", dict)
"""


def test_misspelled_hook_is_named_and_the_plugin_skipped(installs):
    installs("tp-typo", {"tp_typo": MISSPELLED})
    with pytest.warns(PluginWarning) as caught:
        host = lgvq_plugins.get_host()
    message = next(str(w.message) for w in caught if "tp_typo" in str(w.message))
    assert "'tp_typo'" in message and "'tp-typo'" in message
    assert "'register_quantizer'" in message and "did you mean 'register_quantizers'" in message
    # skipped as a whole: not even its correctly spelled hook ran; everything else works
    assert "tp_misspelled_metric" not in host.registries["metric"]
    assert host.pm.get_plugin("tp_typo") is None and host.infos["tp_typo"].error
    assert {"vq", "cvq"} <= set(lgvq_plugins.list_quantizers())


def test_misspelled_hook_is_an_error_in_strict_mode_and_in_process(installs, monkeypatch):
    installs("tp-typo", {"tp_typo": MISSPELLED})
    monkeypatch.setenv("LGVQ_STRICT_PLUGINS", "1")
    with pytest.raises(PluginLoadError, match="tp_typo.*'register_quantizer'.*did you mean"):
        lgvq_plugins.get_host()
    # a failed load leaves nothing half-made: the next access tries again and fails again
    with pytest.raises(PluginLoadError, match="tp_typo"):
        lgvq_plugins.list_quantizers()
    monkeypatch.setenv("LGVQ_PLUGINS", "")
    assert "vq" in lgvq_plugins.list_quantizers()

    class Typo:
        @hookspecs.hookimpl
        def register_dataset(self, register):
            register("never", list)

    with pytest.raises(PluginLoadError, match="'register_dataset'.*did you mean 'register_datasets'"):
        lgvq_plugins.get_host().register_plugin(Typo(), name="typo-in-process")
    assert lgvq_plugins.get_host().pm.get_plugin("typo-in-process") is None


class _FakeVQ(torch.nn.Module):
    """A quantizer some plugin wants to put in place of the built-in ``vq``."""

    def __init__(self, dim: int, **settings):
        super().__init__()
        self.dim = dim


REPLACES_THEN_FAILS = """
    import torch
    from lgvq_plugins.hookspecs import hookimpl

    class Impostor(torch.nn.Module):
        def __init__(self, dim, **settings):
            super().__init__()

    @hookimpl
    def register_quantizers(register):
        register("vq", Impostor, exist_ok=True)
        register("tp_half_made", Impostor)
        raise RuntimeError("fails half-way")
"""


def _tiny_vqvae():
    return lgvq_plugins.create_backbone("vqvae", ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=8,
                                        embed_dim=8, quantizer_config={"num_codes": 16})


def test_plugin_failing_half_way_is_rolled_back_with_what_it_replaced(installs):
    from gin import config as gin_config

    from lgvq_plugins.backbones.vq import VectorQuantizer

    installs("tp-rollback", {"tp_rollback": REPLACES_THEN_FAILS})
    with pytest.warns(PluginWarning, match="tp_rollback.*fails half-way.*taken back"):
        host = lgvq_plugins.get_host()
    entry = host.registries["quantizer"].entry("vq")
    assert entry.original is VectorQuantizer and entry.source.startswith("built-in")
    assert "tp_half_made" not in host.registries["quantizer"]
    # gin's table holds the built-in again: bindings reach it, and vqvae builds with it
    assert gin_config._REGISTRY["lgvq.quantizer.vq"].wrapped is VectorQuantizer
    gin.parse_config(["vq.beta = 0.125"])
    model = _tiny_vqvae()
    assert type(model.quantizer).__name__ == "VectorQuantizer" and model.quantizer.beta == 0.125


def test_in_process_override_wins_and_unregistering_restores_the_built_in(fresh_plugins, capsys):
    from lgvq_plugins.backbones.vq import VectorQuantizer
    from lgvq_plugins.cli import main

    class Override:
        @hookspecs.hookimpl
        def register_quantizers(self, register):
            register("vq", _FakeVQ, exist_ok=True)

    host = lgvq_plugins.get_host()
    name = host.register_plugin(Override(), name="override-vq")
    try:
        assert isinstance(lgvq_plugins.create_quantizer("vq", dim=4), _FakeVQ)
        assert isinstance(_tiny_vqvae().quantizer, _FakeVQ)
        main(["plugins"])  # the listing says who is in effect
        out = capsys.readouterr().out
        assert "quantizer: vq (replaced by plugin 'override-vq'" in out
    finally:
        host.unregister_plugin(name)
    assert lgvq_plugins.registry("quantizer").entry("vq").original is VectorQuantizer
    assert type(_tiny_vqvae().quantizer).__name__ == "VectorQuantizer"


def test_in_code_registration_before_first_use_wins_over_the_built_in(fresh_plugins):
    """``@register_quantizer("vq", exist_ok=True)`` in a script, before anything is listed."""
    from lgvq_plugins.backbones.vq import VectorQuantizer

    @lgvq_plugins.register_quantizer("vq", exist_ok=True)
    class MyVQ(_FakeVQ):
        mine = True  # (the decorator returns gin's wrapper class, so test a marker, not isinstance)

    try:
        assert {"vqvae", "vqgan"} <= set(lgvq_plugins.list_backbones())  # plugins loaded after it
        assert getattr(lgvq_plugins.create_quantizer("vq", dim=4), "mine", False)
        assert getattr(_tiny_vqvae().quantizer, "mine", False)
        gin.parse_config(["vq.dim = 6"])  # gin's table names the code registration too
        assert lgvq_plugins.create_quantizer("vq").dim == 6
        listing = {i.name: i for i in lgvq_plugins.plugin_infos()}
        assert listing["<registered in code>"].registered == {"quantizer": ["vq"]}
        lgvq_plugins.reset_plugins()  # code registrations outlive a reload, and still win
        assert getattr(lgvq_plugins.create_quantizer("vq", dim=4), "mine", False)
    finally:
        lgvq_plugins.registry("quantizer").remove("vq")  # the code registration in effect
    assert lgvq_plugins.registry("quantizer").entry("vq").original is VectorQuantizer


def test_in_code_clash_without_exist_ok_fails_every_time_and_names_both(fresh_plugins):
    @lgvq_plugins.register_quantizer("vq")
    class MyVQ(_FakeVQ):
        pass

    try:
        for _ in range(2):  # not "[]" the second time: a failed load is undone, then retried
            with pytest.raises(lgvq_plugins.DuplicateComponentError,
                               match="'vq' is registered twice: by code:.*MyVQ and by built-in.*exist_ok=True"):
                lgvq_plugins.list_backbones()
    finally:  # (registry() would load plugins, and fail again)
        lgvq_plugins.get_host(load=False).registries["quantizer"].remove("vq")
    assert "vqvae" in lgvq_plugins.list_backbones()


def test_a_plugins_wrapper_wraps_its_own_registration(fresh_plugins):
    calls: list[str] = []

    class Wrapped:
        @hookspecs.hookimpl(wrapper=True, specname="register_metrics")
        def around(self, register):
            calls.append("before")
            result = yield
            calls.append("after")
            return result

        @hookspecs.hookimpl
        def register_metrics(self, register):
            calls.append("impl")
            register("wrapped_metric_for_test", dict)

    host = lgvq_plugins.get_host()
    name = host.register_plugin(Wrapped(), name="wrapped-test")
    try:
        assert calls == ["before", "impl", "after"]
        assert "wrapped_metric_for_test" in lgvq_plugins.list_metrics()
    finally:
        host.unregister_plugin(name)
