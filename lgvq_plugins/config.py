"""gin files: finding them (a path that exists, else the bundled configs) and parsing them
after every plugin has registered its configurables."""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
from importlib import resources
from pathlib import Path
from typing import Iterable, Sequence

import gin

from lgvq_plugins.plugins import get_host

_SEARCH_PATHS: set[str] = set()  # folders this process has given gin to look up includes in


#: Modules whose ``@gin.configurable`` classes (Experiment, Trainer, LanguageGuided, ...)
#: gin files refer to; imported before parsing so every name is known.
CONFIGURABLE_MODULES: tuple[str, ...] = (
    "lgvq_plugins.training.experiment",
    "lgvq_plugins.training.trainer",
    "lgvq_plugins.guidance.model",
    "lgvq_plugins.evaluation.evaluate",   # Evaluation (lgvq eval)
    "lgvq_plugins.evaluation.compare",    # Comparison (lgvq compare)
)


def bundled_gin_dir() -> Path:
    """Folder of the gin files shipped with the package (the repository's ``gin/``).

    A regular install puts them in ``lgvq_plugins/configs/`` (package data); an editable
    install leaves them in the source tree's ``gin/`` next to the package.
    """
    installed = Path(str(resources.files("lgvq_plugins"))) / "configs"
    if installed.is_dir():
        return installed
    return Path(__file__).resolve().parent.parent / "gin"


def bundled_configs() -> list[str]:
    """Relative paths of every bundled ``.gin`` file."""
    root = bundled_gin_dir()
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.gin"))


def resolve_gin_file(name: str | os.PathLike[str]) -> Path:
    """A path that exists wins; otherwise look in the bundled gin folder (with or without
    a leading ``gin/``). A miss lists the bundled configs."""
    path = Path(name)
    if path.is_file():
        return path
    root = bundled_gin_dir()
    candidates = [root / path]
    if path.parts and path.parts[0] == "gin":
        candidates.append(root.joinpath(*path.parts[1:]))
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    listing = "\n  ".join(bundled_configs()) or "(none)"
    raise FileNotFoundError(
        f"gin file {str(name)!r} not found: it is neither a file relative to {os.getcwd()} "
        f"nor a bundled config. Bundled configs:\n  {listing}"
    )


def parse_gin(files: Sequence[str | os.PathLike[str]] = (), bindings: Iterable[str] = (),
              *, finalize: bool = False) -> list[Path]:
    """Load plugins, then parse ``files`` in order and ``bindings`` after them.

    ``include`` statements resolve relative to the including file, then to the bundled gin
    folder. gin's own errors (with file and line) propagate unchanged, so a bad binding or
    an unknown configurable fails before any work starts.
    """
    get_host()  # every registered component must be configurable before parsing
    for module in CONFIGURABLE_MODULES:
        importlib.import_module(module)
    resolved = [resolve_gin_file(f) for f in files]
    search_paths = [bundled_gin_dir(), *(p.parent for p in resolved)]
    for path in search_paths:
        # gin never forgets a search path (clear_config keeps them), so remembering what we
        # added is enough to avoid piling up duplicates.
        if str(path) not in _SEARCH_PATHS:
            gin.add_config_file_search_path(str(path))
            _SEARCH_PATHS.add(str(path))
    with _quiet_include_probing():
        gin.parse_config_files_and_bindings([str(p) for p in resolved], list(bindings),
                                            finalize_config=finalize)
    return resolved


class _DropPathNotFound(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Path not found")


@contextlib.contextmanager
def _quiet_include_probing():
    """gin tries each search path in turn for an ``include`` and logs an ERROR for every
    folder that lacks the file, even when a later folder has it. Those lines look like
    failures to users; a real miss still raises with the list of searched paths."""
    quiet = _DropPathNotFound()
    root = logging.getLogger()
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)
