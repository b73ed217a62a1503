"""Make ``lgvq_plugins.backbones`` and ``lgvq_plugins.tasks`` importable from a source checkout.

An install maps the repository's top-level ``backbones/`` and ``tasks/`` folders into the
package (setuptools ``package-dir``). When the checkout itself is first on ``sys.path`` — for
example ``python -m lgvq_plugins.run`` started in the repository root after a regular
``pip install .`` — Python imports this source folder instead of the installed copy, and the
mapped subpackages would be missing. This finder supplies them from the sibling folders.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent
_MAPPED = {f"lgvq_plugins.{name}": _PACKAGE_DIR.parent / name for name in ("backbones", "tasks")}


class _SourceLayoutFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        folder = _MAPPED.get(fullname)
        if folder is None or not (folder / "__init__.py").is_file():
            return None
        return importlib.util.spec_from_file_location(
            fullname, folder / "__init__.py", submodule_search_locations=[str(folder)])


def install() -> None:
    """Append the finder once; installed layouts find their subpackages before it is asked."""
    if (_PACKAGE_DIR / "backbones").exists():
        return  # an installed copy: the subpackages are real folders here
    if not any(isinstance(f, _SourceLayoutFinder) for f in sys.meta_path):
        sys.meta_path.append(_SourceLayoutFinder())
