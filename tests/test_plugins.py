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
