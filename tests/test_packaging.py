"""Packaging: a regular (non-editable) install ships the gin files and maps backbones/ and
tasks/ under lgvq_plugins; a source checkout on sys.path finds the same subpackages."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _python(code: str, cwd: Path, pythonpath: list[str], *flags: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(pythonpath), "LGVQ_DISABLE_ENTRYPOINTS": "1"}
    proc = subprocess.run([sys.executable, *flags, "-c", code], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


@pytest.fixture(scope="module")
def installed_copy(tmp_path_factory) -> Path:
    """Build a wheel of this checkout and install it (no dependencies) into a folder.

    The build runs on a copy of the sources: setuptools reuses a ``build/`` folder in the
    tree it builds, and a stale one would ship files that were renamed or deleted since.
    """
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    for folder in ("lgvq_plugins", "backbones", "tasks", "gin"):
        shutil.copytree(REPO / folder, source / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp / "dist"), str(source)], check=True, capture_output=True,
                   timeout=300)
    wheel = next((tmp / "dist").glob("lgvq_plugins-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(tmp / "site"), str(wheel)], check=True, capture_output=True, timeout=300)
    return tmp / "site"


def test_wheel_layout(installed_copy):
    package = installed_copy / "lgvq_plugins"
    assert (package / "backbones" / "__init__.py").is_file()
    assert (package / "tasks" / "__init__.py").is_file()
    shipped = sorted(p.relative_to(package / "configs").as_posix() for p in (package / "configs").rglob("*.gin"))
    in_repo = sorted(p.relative_to(REPO / "gin").as_posix() for p in (REPO / "gin").rglob("*.gin"))
    assert shipped == in_repo
    # no generic top-level module lands in site-packages
    assert not (installed_copy / "tasks").exists() and not (installed_copy / "backbones").exists()


def test_installed_copy_resolves_bundled_configs(installed_copy, tmp_path):
    code = ("import lgvq_plugins, lgvq_plugins.backbones, lgvq_plugins.tasks\n"
            "from lgvq_plugins.config import bundled_configs, resolve_gin_file\n"
            "names = bundled_configs()\n"
            "print(lgvq_plugins.__file__)\n"
            "print(len(names))\n"
            "print(resolve_gin_file(names[0]) if names else '')\n"
            "try:\n    resolve_gin_file('missing.gin')\nexcept FileNotFoundError as e:\n    print('MISS', e)\n")
    out = _python(code, tmp_path, [str(installed_copy)]).splitlines()
    assert out[0].startswith(str(installed_copy))
    if int(out[1]):
        assert out[2].startswith(str(installed_copy / "lgvq_plugins" / "configs"))
    assert any(line.startswith("MISS") for line in out)


def test_source_checkout_on_sys_path_finds_mapped_subpackages(tmp_path):
    """``python -S`` skips the editable-install hook, so only the source layout can answer."""
    purelib = sysconfig.get_paths()["purelib"]
    out = _python("import lgvq_plugins.backbones as b, lgvq_plugins.tasks as t; print(b.__file__); print(t.__file__)",
                  tmp_path, [str(REPO), purelib], "-S")
    backbones_file, tasks_file = out.split()
    assert Path(backbones_file) == REPO / "backbones" / "__init__.py"
    assert Path(tasks_file) == REPO / "tasks" / "__init__.py"


# ---------------------------------------------------------------------------------------
# Private APIs of dependencies: pinned in pyproject.toml, checked here
# ---------------------------------------------------------------------------------------
# No public replacement exists for these (docs/plugins.md and the comments at each use say
# why), so pyproject.toml caps each dependency at the versions tested, and these tests fail
# with a message naming the API and the pin when an installed version changes them.


def _pin(distribution: str):
    import tomllib

    from packaging.requirements import Requirement

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        req = Requirement(dep)
        if req.name.replace("_", "-").lower() == distribution:
            return req.specifier
    raise AssertionError(f"{distribution} is not a dependency in pyproject.toml")


def _check(distribution: str, api: str, ok: bool) -> None:
    import importlib.metadata as metadata

    version = metadata.version(distribution)
    pin = _pin(distribution)
    assert pin.contains(version, prereleases=True), (
        f"{distribution} {version} is outside the range pyproject.toml pins ({pin}) because "
        f"lgvq-plugins uses its private {api}; check that API, then move the pin")
    assert ok, (f"{distribution} {version} changed its private {api}, which lgvq-plugins uses "
                f"(pinned {pin} in pyproject.toml): adapt the call site, then the pin")


def test_gin_private_registry_is_as_pinned():
    from gin import config as gin_config

    table = getattr(gin_config, "_REGISTRY", None)
    ok = table is not None and all(hasattr(table, m) for m in ("get", "pop", "__setitem__", "__contains__"))
    if ok:  # records carry the wrapped factory (registry.py restores records by it)
        record = getattr(gin_config, "Configurable", None)
        ok = record is not None and "wrapped" in record._fields
    _check("gin-config", "gin.config._REGISTRY (a SelectorMap of Configurable records)", ok)


def test_torchmetrics_private_lpips_network_is_as_pinned():
    import inspect

    import torch

    try:
        from torchmetrics.functional.image.lpips import _NoTrainLpips
    except ImportError:
        _check("torchmetrics", "torchmetrics.functional.image.lpips._NoTrainLpips", False)
    params = inspect.signature(_NoTrainLpips).parameters
    ok = {"net", "pretrained", "pnet_rand", "model_path"} <= set(params)
    if ok:  # random backbone, shipped linear heads: nothing to download
        net = _NoTrainLpips(net="squeeze", pretrained=True, pnet_rand=True)
        names = list(net.net.state_dict())
        ok = any(n.startswith("slices.") for n in names)  # perceptual.py maps weights by these names
        x = torch.zeros(1, 3, 32, 32)
        ok = ok and net(x, x).numel() == 1
    _check("torchmetrics", "_NoTrainLpips(net, pretrained, pnet_rand, model_path) and its slices", ok)


def test_ddp_private_ignore_list_is_as_pinned():
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    method = getattr(DistributedDataParallel, "_set_params_and_buffers_to_ignore_for_model", None)
    ok = method is not None and list(inspect.signature(method).parameters) == ["module", "params_and_buffers_to_ignore"]
    _check("torch", "DistributedDataParallel._set_params_and_buffers_to_ignore_for_model", ok)


def test_open_clip_private_text_tower_builder_is_as_pinned():
    import inspect

    try:
        from open_clip.model import _build_text_tower
    except ImportError:
        _check("open-clip-torch", "open_clip.model._build_text_tower", False)
    ok = list(inspect.signature(_build_text_tower).parameters)[:4] == ["embed_dim", "text_cfg", "quick_gelu",
                                                                       "cast_dtype"]
    _check("open-clip-torch", "open_clip.model._build_text_tower(embed_dim, text_cfg, quick_gelu, cast_dtype)", ok)
