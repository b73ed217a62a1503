"""Packaging: a regular (non-editable) install ships the gin files and maps backbones/ and
tasks/ under lgvq_plugins; a source checkout on sys.path finds the same subpackages."""

from __future__ import annotations

import os
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
    """Build a wheel of this checkout and install it (no dependencies) into a folder."""
    tmp = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp / "dist"), str(REPO)], check=True, capture_output=True,
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
