"""Named registries of components, one per kind, filled by plugins.

A registry maps a name to a factory (a class or a function). Registering makes the factory
gin-configurable under that name, so ``create_<kind>(name, **kwargs)`` and a gin file see the
same object, and gin bindings apply no matter how the component is built.
"""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import gin
from gin import config as gin_config

#: kinds of component, in the order the hooks are declared; the value is the gin module.
KINDS: tuple[str, ...] = (
    "quantizer",
    "backbone",
    "text_encoder",
    "alignment_loss",
    "dataset",
    "task",
    "metric",
)


class UnknownComponentError(KeyError):
    """Raised for a name that no plugin registered. The message lists the valid names."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


class DuplicateComponentError(ValueError):
    """Raised when a second registrant claims a taken name without ``exist_ok=True``."""


@dataclass(frozen=True)
class Entry:
    """One registered component."""

    kind: str
    name: str
    factory: Callable[..., Any]  # the gin-configurable wrapper
    original: Callable[..., Any]  # what the plugin passed in
    source: str  # plugin (or module) that registered it


# gin keeps configurables in a process-wide table that cannot forget a name. We wrap each
# (kind, name, factory) once and reuse the wrapper, so reloading plugins (tests, notebooks)
# re-registers the same object without a clash.
_GIN_WRAPPERS: dict[tuple[str, str, int], Callable[..., Any]] = {}


def _gin_module(kind: str) -> str:
    return f"lgvq.{kind}"


def _forget_gin_configurable(kind: str, name: str) -> None:
    """Drop a configurable from gin's table so another factory can take the name."""
    registry = gin_config._REGISTRY  # noqa: SLF001 - gin has no public "unregister"
    key = f"{_gin_module(kind)}.{name}"
    if key in registry:
        registry.pop(key)


def _make_gin_configurable(kind: str, name: str, factory: Callable[..., Any]) -> Callable[..., Any]:
    key = (kind, name, id(factory))
    wrapper = _GIN_WRAPPERS.get(key)
    if wrapper is not None:
        return wrapper
    _forget_gin_configurable(kind, name)
    wrapper = gin.external_configurable(factory, name=name, module=_gin_module(kind))
    _GIN_WRAPPERS[key] = wrapper
    return wrapper


class Registry:
    """Name → factory for one kind of component."""

    def __init__(self, kind: str):
        if kind not in KINDS:
            raise ValueError(f"unknown component kind {kind!r}; kinds are {', '.join(KINDS)}")
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    # -- filling ----------------------------------------------------------------------
    def add(
        self,
        name: str,
        factory: Callable[..., Any],
        *,
        source: str = "<code>",
        exist_ok: bool = False,
    ) -> Callable[..., Any]:
        """Register ``factory`` under ``name``; returns the gin-configurable wrapper."""
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(
                f"{self.kind} name {name!r} (from {source}) must be a Python identifier "
                "so that gin files can refer to it"
            )
        if not callable(factory):
            raise TypeError(f"{self.kind} {name!r} from {source}: factory {factory!r} is not callable")
        old = self._entries.get(name)
        if old is not None:
            if old.original is factory:
                return old.factory  # the same object again (e.g. plugins reloaded): harmless
            if not exist_ok:
                raise DuplicateComponentError(
                    f"{self.kind} {name!r} is registered twice: by {old.source} and by {source}. "
                    "Rename one, or pass exist_ok=True to let the later one replace it."
                )
        wrapped = _make_gin_configurable(self.kind, name, factory)
        self._entries[name] = Entry(self.kind, name, wrapped, factory, source)
        return wrapped

    def remove(self, name: str) -> None:
        """Forget ``name`` (used by tests and by plugin reloads)."""
        self._entries.pop(name, None)

    def clear(self) -> None:
        self._entries.clear()

    # -- reading ----------------------------------------------------------------------
    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def entry(self, name: str) -> Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownComponentError(self._unknown_message(name)) from None

    def get(self, name: str) -> Callable[..., Any]:
        """The gin-configurable factory registered under ``name``."""
        return self.entry(name).factory

    def names(self, pattern: str | None = None) -> list[str]:
        """Sorted names, optionally filtered by a glob such as ``"vq*"``."""
        names = sorted(self._entries)
        if pattern:
            names = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        return names

    def create(self, name: str, /, **kwargs: Any) -> Any:
        """Build ``name``. Keyword arguments that are ``None`` are dropped (as timm does), so
        callers can pass optional overrides without clobbering gin bindings or defaults."""
        factory = self.get(name)
        component = factory(**{k: v for k, v in kwargs.items() if v is not None})
        try:  # remembered so a saved model can say which factory rebuilds it
            component.lgvq_registry_name = name
        except (AttributeError, TypeError):
            pass
        return component

    def _unknown_message(self, name: str) -> str:
        names = sorted(self._entries)
        close = difflib.get_close_matches(str(name), names, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        listing = ", ".join(names) if names else "(none: no plugin registered one)"
        return f"unknown {self.kind} {name!r}.{hint} Registered {self.kind}s: {listing}."
