"""What a component was built with, and rebuilding it from saved settings alone.

* :func:`resolved_arguments` — the arguments a factory really received: its signature's
  defaults, overlaid with the gin bindings in force, overlaid with what the caller passed
  (exactly gin's own precedence). ``None`` values are kept: a saved ``None`` is a value.
* :func:`create_recorded` — build a registered component through its gin wrapper and
  remember its registry name and resolved arguments on it, for ``save_pretrained``.
* :func:`check_arguments` — saved keys against a factory's signature, before anything is built.
* :func:`gin_isolated` — no gin binding of the calling process applies inside (a reload
  rebuilds what was saved, whatever the loading process has bound).
* :func:`import_paths_allowed` / :func:`import_object` — ``"module:callable"`` strings are
  imported only where the caller allowed it (``from_pretrained(trust_remote_code=True)``).
* :func:`strip_local` / :func:`deep_merge` — machine-local settings (paths) out of a saved
  config, and load-time settings back in.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import importlib
import inspect
import os
import re
from typing import Any, Callable, Iterable, Iterator, Mapping

import gin

from lgvq_plugins import api

#: ``module.sub:attr.attr`` — what an import path in a config looks like.
IMPORT_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")

_KEYWORD_KINDS = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


class SettingsError(ValueError):
    """A saved configuration does not fit the code that should rebuild it."""


class RemoteCodeError(SettingsError):
    """A saved configuration names code to import and the caller did not allow it."""


# ---------------------------------------------------------------------------------------
# Signatures and resolved arguments
# ---------------------------------------------------------------------------------------


def _parameters(factory: Callable[..., Any]) -> dict[str, inspect.Parameter]:
    try:
        return dict(inspect.signature(factory).parameters)
    except (TypeError, ValueError):  # builtins and some C extensions have none
        return {}


def accepts_any_keyword(factory: Callable[..., Any]) -> bool:
    """True when ``factory`` takes ``**kwargs`` (no key can be called unknown)."""
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in _parameters(factory).values())


def resolved_arguments(factory: Callable[..., Any], given: Mapping[str, Any] | None = None, *,
                       gin_name: str | None = None) -> dict[str, Any]:
    """Every keyword argument ``factory`` receives when called with ``given`` while the
    current gin bindings of ``gin_name`` are in force: defaults ⊕ bindings ⊕ ``given``."""
    args = {name: p.default for name, p in _parameters(factory).items()
            if p.kind in _KEYWORD_KINDS and p.default is not inspect.Parameter.empty}
    if gin_name is not None:
        try:
            args.update(gin.get_bindings(gin_name))
        except (ValueError, KeyError, TypeError):
            pass  # not gin-configurable under that name: defaults and given arguments only
    args.update(given or {})
    return args


def registered_gin_name(kind: str, name: str) -> str:
    """The gin name of a registered component (``lgvq.<kind>.<name>``, see ``registry``)."""
    return f"lgvq.{kind}.{name}"


def create_recorded(kind: str, name: str, /, **given: Any) -> Any:
    """Build the registered ``name`` of ``kind`` (gin bindings apply, ``None`` is passed on
    as a value) and record on it ``lgvq_registry_name`` and ``lgvq_config`` (its resolved
    arguments), which ``save_pretrained`` writes."""
    entry = api.registry(kind).entry(name)
    component = entry.factory(**given)
    try:
        component.lgvq_registry_name = name
        component.lgvq_config = resolved_arguments(entry.original, given,
                                                   gin_name=registered_gin_name(kind, name))
    except (AttributeError, TypeError):
        pass  # an immutable component (e.g. a function's result): nothing to record on
    return component


def check_arguments(factory: Callable[..., Any], settings: Mapping[str, Any], *, where: str,
                    supplied: Iterable[str] = ()) -> None:
    """Raise :class:`SettingsError` when ``settings`` has keys ``factory`` does not take, or
    lacks a required one (``supplied``: keys the caller adds itself, e.g. ``dim``)."""
    params = _parameters(factory)
    if not params:
        return
    keywords = {n for n, p in params.items() if p.kind in _KEYWORD_KINDS}
    if not accepts_any_keyword(factory):
        unknown = sorted(set(settings) - keywords)
        if unknown:
            raise SettingsError(
                f"{where}: unknown setting(s) {unknown}; {_label(factory)} accepts "
                f"{sorted(keywords)}. The file was written by another version of the code or "
                "edited by hand; remove those keys (or install the version that wrote it).")
    required = sorted(n for n in keywords if params[n].default is inspect.Parameter.empty
                      and n not in settings and n not in set(supplied))
    if required:
        raise SettingsError(f"{where}: required setting(s) {required} of {_label(factory)} are "
                            "missing from the saved configuration")


def _label(factory: Callable[..., Any]) -> str:
    return f"{getattr(factory, '__module__', '?')}.{getattr(factory, '__qualname__', factory)}"


# ---------------------------------------------------------------------------------------
# gin isolation
# ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def gin_isolated() -> Iterator[None]:
    """Inside, gin sees no binding (as after ``gin.clear_config()``); on exit every
    binding, singleton and the operative config of the caller are back.

    gin has no public "save/restore": its module-level tables are copied and put back
    (the same private state ``gin.clear_config`` empties). gin is process-global, so another
    thread building a configurable meanwhile would see no bindings either.
    """
    from gin import config as gin_config

    table, singletons = gin_config._CONFIG, gin_config._SINGLETONS  # noqa: SLF001
    saved = {key: dict(values) for key, values in table.items()}
    saved_singletons = dict(singletons)
    with gin_config._OPERATIVE_CONFIG_LOCK:  # noqa: SLF001
        saved_operative = {key: dict(v) for key, v in gin_config._OPERATIVE_CONFIG.items()}  # noqa: SLF001
    table.clear()
    singletons.clear()
    try:
        yield
    finally:
        table.clear()
        table.update(saved)
        singletons.clear()
        singletons.update(saved_singletons)
        with gin_config._OPERATIVE_CONFIG_LOCK:  # noqa: SLF001
            # what the rebuild used is not part of the caller's experiment
            gin_config._OPERATIVE_CONFIG.clear()  # noqa: SLF001
            gin_config._OPERATIVE_CONFIG.update(saved_operative)  # noqa: SLF001


# ---------------------------------------------------------------------------------------
# Import paths
# ---------------------------------------------------------------------------------------

_IMPORTS_ALLOWED: contextvars.ContextVar[bool] = contextvars.ContextVar("lgvq_import_paths", default=True)


def is_import_path(value: Any) -> bool:
    """Whether ``value`` is a ``"module:callable"`` string."""
    return isinstance(value, str) and bool(IMPORT_PATH.match(value))


@contextlib.contextmanager
def import_paths_allowed(allowed: bool) -> Iterator[None]:
    """While inside, :func:`import_object` imports only if ``allowed`` (code a user writes
    may name import paths; a file being loaded may not, unless trusted)."""
    token = _IMPORTS_ALLOWED.set(bool(allowed))
    try:
        yield
    finally:
        _IMPORTS_ALLOWED.reset(token)


def remote_code_message(key: str, value: str) -> str:
    return (f"{key} = {value!r} is an import path: loading it would import and run that code. "
            "A saved model may only name registered components. If you trust where this folder "
            "came from, pass trust_remote_code=True to from_pretrained; otherwise register the "
            "component (a plugin) and save the model again, so its config holds a registry name.")


def refuse_import_paths(value: Any, key: str) -> None:
    """Every ``"module:callable"`` string (value or mapping key) in a saved config is refused."""
    if is_import_path(value):
        raise RemoteCodeError(remote_code_message(key, value))
    if isinstance(value, Mapping):
        for k, v in value.items():
            if is_import_path(k):
                raise RemoteCodeError(remote_code_message(f"{key} key", k))
            refuse_import_paths(v, f"{key}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            refuse_import_paths(v, f"{key}[{i}]")


def import_object(path: str, *, key: str) -> Any:
    """Import ``"module:qualname"``; refused with :class:`RemoteCodeError` (naming ``key``)
    inside ``import_paths_allowed(False)``."""
    if not is_import_path(path):
        raise ValueError(f"{key} = {path!r} is not an import path of the form 'package.module:callable'")
    if not _IMPORTS_ALLOWED.get():
        raise RemoteCodeError(remote_code_message(key, path))
    module, _, qualname = path.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


# ---------------------------------------------------------------------------------------
# Machine-local settings
# ---------------------------------------------------------------------------------------


def _describe(value: Any) -> str:
    """What a removed local setting was, without the machine's directory layout."""
    if isinstance(value, (str, os.PathLike)):
        return os.path.basename(os.path.normpath(os.fspath(value))) or str(value)
    return type(value).__name__


def strip_local(config: Mapping[str, Any], local_keys: Iterable[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """``config`` without the (dotted, e.g. ``perceptual_config.backbone_weights``) keys in
    ``local_keys``; also returns ``{dotted key: file name}`` for those that were set."""
    out = copy.deepcopy(dict(config))
    removed: dict[str, str] = {}
    for dotted in local_keys:
        *parents, leaf = dotted.split(".")
        node: Any = out
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node:
            value = node.pop(leaf)
            if value is not None:
                removed[dotted] = _describe(value)
    return out, removed


def has_key(config: Mapping[str, Any], dotted: str) -> bool:
    """Whether the dotted key is present in nested ``config``."""
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``override`` on top; nested mappings merge instead of replacing."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


__all__ = ["SettingsError", "RemoteCodeError", "resolved_arguments", "create_recorded",
           "check_arguments", "accepts_any_keyword", "gin_isolated", "import_paths_allowed",
           "import_object", "is_import_path", "refuse_import_paths", "strip_local", "deep_merge", "has_key"]
