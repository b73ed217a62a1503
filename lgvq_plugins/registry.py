"""Named registries of components, one per kind, filled by plugins and by code.

A registry maps a name to a factory (a class or a function). Registering makes the factory
gin-configurable under that name, so ``create_<kind>(name, **kwargs)`` and a gin file see the
same object, and gin bindings apply no matter how the component is built.

**Precedence.** A name may be registered more than once; the registration in effect is the
one with the highest ``(origin, exist_ok, order)``: code (a decorator in a user's script)
beats third-party plugins, which beat built-ins; at equal origin an ``exist_ok=True``
registration beats one without, and among those the later one wins. A new registration is
refused (:class:`DuplicateComponentError`, naming both registrants) unless it passes
``exist_ok=True`` or every registration already there declared ``exist_ok=True`` and
outranks it. The others are kept underneath: removing the one in effect (a plugin rolled
back or unregistered) brings back the one it replaced, in the registry and in gin's table.
"""

from __future__ import annotations

import difflib
import enum
import fnmatch
import itertools
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import gin
from gin import config as gin_config

#: kinds of component, in the order the hooks are declared; the gin module is ``lgvq.<kind>``.
KINDS: tuple[str, ...] = (
    "quantizer",
    "backbone",
    "text_encoder",
    "alignment_loss",
    "perceptual_loss",
    "dataset",
    "task",
    "metric",
)


def plural(kind: str) -> str:
    """``alignment_loss`` → ``alignment_losses``, ``quantizer`` → ``quantizers``."""
    return f"{kind}es" if kind.endswith("s") else f"{kind}s"


class Origin(enum.IntEnum):
    """Who registered a component; a higher origin takes precedence (see module docs)."""

    BUILTIN = 0
    PLUGIN = 1
    CODE = 2


class UnknownComponentError(KeyError):
    """Raised for a name that no plugin registered. The message lists the valid names."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


class DuplicateComponentError(ValueError):
    """Raised when a second registrant claims a taken name without ``exist_ok=True``."""


@dataclass(frozen=True)
class Entry:
    """One registration of a component."""

    kind: str
    name: str
    factory: Callable[..., Any]  # the gin-configurable wrapper
    original: Callable[..., Any]  # what the plugin passed in
    source: str  # human-readable registrant, used in messages and listings
    origin: Origin = Origin.CODE
    exist_ok: bool = False
    owner: str | None = None  # plugin name, so the host can take back what a plugin added
    order: int = 0  # global registration counter: later registrations have larger numbers

    @property
    def rank(self) -> tuple[int, bool, int]:
        return (int(self.origin), self.exist_ok, self.order)


_ORDER = itertools.count()

# --------------------------------------------------------------------------------------
# gin's table of configurables
# --------------------------------------------------------------------------------------
# gin keeps configurables in a process-wide table and has no public way to forget or
# replace one. We wrap each (kind, name, factory) once, remember the table record gin made
# for it, and put the record of whichever registration is in effect back into the table.
# This uses gin's private ``gin.config._REGISTRY`` (a ``SelectorMap``); pyproject pins the
# tested gin-config range and tests/test_packaging.py fails loudly if it changes shape.
_GIN_WRAPPERS: dict[tuple[str, str, int], tuple[Callable[..., Any], Any]] = {}


def gin_selector(kind: str, name: str) -> str:
    """Full gin name of a registered component, e.g. ``lgvq.quantizer.vq``."""
    return f"lgvq.{kind}.{name}"


def _gin_table() -> Any:
    return gin_config._REGISTRY  # noqa: SLF001 - no public API to replace a configurable


def _make_gin_configurable(kind: str, name: str, factory: Callable[..., Any]) -> Callable[..., Any]:
    key = (kind, name, id(factory))
    cached = _GIN_WRAPPERS.get(key)
    if cached is not None and cached[1].wrapped is factory:
        return cached[0]
    table, selector = _gin_table(), gin_selector(kind, name)
    previous = table.get(selector)
    if previous is not None:
        table.pop(selector)  # gin refuses a second configurable of the same name
    wrapper = gin.external_configurable(factory, name=name, module=f"lgvq.{kind}")
    _GIN_WRAPPERS[key] = (wrapper, table[selector])
    if previous is not None:  # the caller decides which record is in effect
        table.pop(selector)
        table[selector] = previous
    return wrapper


def _install_gin_record(entry: Entry | None, kind: str, name: str, dropped: Entry | None = None) -> None:
    """Make gin's table hold ``entry``'s configurable under its name (``None``: remove the
    record of ``dropped``, if it is the one there)."""
    table, selector = _gin_table(), gin_selector(kind, name)
    current = table.get(selector)
    if entry is None:
        if current is not None and dropped is not None and current.wrapped is dropped.original:
            table.pop(selector)
        return
    record = _GIN_WRAPPERS[(kind, name, id(entry.original))][1]
    if current is not record:
        if current is not None:
            table.pop(selector)
        table[selector] = record


class Registry:
    """Name → factory for one kind of component, with the precedence rules above."""

    def __init__(self, kind: str):
        if kind not in KINDS:
            raise ValueError(f"unknown component kind {kind!r}; kinds are {', '.join(KINDS)}")
        self.kind = kind
        self._stacks: dict[str, list[Entry]] = {}  # every registration of a name, oldest first

    # -- filling ----------------------------------------------------------------------
    def add(
        self,
        name: str,
        factory: Callable[..., Any],
        *,
        source: str = "<code>",
        exist_ok: bool = False,
        origin: Origin = Origin.CODE,
        owner: str | None = None,
    ) -> Callable[..., Any]:
        """Register ``factory`` under ``name``; returns its gin-configurable wrapper.

        Raises:
            DuplicateComponentError: ``name`` is taken and neither side allows it (see the
                module docs); the message names both registrants.
        """
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(
                f"{self.kind} name {name!r} (from {source}) must be a Python identifier "
                "so that gin files can refer to it"
            )
        if not callable(factory):
            raise TypeError(f"{self.kind} {name!r} from {source}: factory {factory!r} is not callable")
        stack = self._stacks.get(name, [])
        for old in stack:
            if old.original is factory:
                return old.factory  # the same object again (e.g. plugins reloaded): harmless
        entry_rank = (int(origin), exist_ok, next(_ORDER))
        if not exist_ok:
            for old in stack:
                if not (old.exist_ok and old.rank > entry_rank):
                    raise DuplicateComponentError(
                        f"{self.kind} {name!r} is registered twice: by {old.source} and by {source}. "
                        "Rename one, or pass exist_ok=True to the one that should replace the other."
                    )
        wrapped = _make_gin_configurable(self.kind, name, factory)
        entry = Entry(self.kind, name, wrapped, factory, source, Origin(origin), exist_ok, owner,
                      entry_rank[2])
        self._stacks.setdefault(name, []).append(entry)
        _install_gin_record(self._winner(name), self.kind, name)
        return wrapped

    def remove(self, name: str) -> None:
        """Forget the registration of ``name`` in effect; one it replaced takes over again."""
        winner = self._winner(name)
        if winner is not None:
            self._drop(name, lambda e: e is winner)

    def remove_owner(self, owner: str) -> list[str]:
        """Forget everything plugin ``owner`` registered (active or shadowed), restoring
        what it replaced. Returns the affected names."""
        names = [n for n, stack in self._stacks.items() if any(e.owner == owner for e in stack)]
        for name in names:
            self._drop(name, lambda e: e.owner == owner)
        return names

    def clear(self) -> None:
        for name in list(self._stacks):
            self._drop(name, lambda e: True)

    def _drop(self, name: str, which: Callable[[Entry], bool]) -> None:
        before = self._winner(name)
        kept = [e for e in self._stacks.get(name, []) if not which(e)]
        if kept:
            self._stacks[name] = kept
        else:
            self._stacks.pop(name, None)
        _install_gin_record(self._winner(name), self.kind, name, dropped=before)

    def _winner(self, name: str) -> Entry | None:
        stack = self._stacks.get(name)
        return max(stack, key=lambda e: e.rank) if stack else None

    # -- reading ----------------------------------------------------------------------
    def __contains__(self, name: object) -> bool:
        return name in self._stacks

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._stacks))

    def __len__(self) -> int:
        return len(self._stacks)

    def entry(self, name: str) -> Entry:
        """The registration of ``name`` in effect."""
        winner = self._winner(name) if isinstance(name, str) else None
        if winner is None:
            raise UnknownComponentError(self._unknown_message(name))
        return winner

    def entries(self, name: str | None = None) -> list[Entry]:
        """Every registration (of ``name``, or of all names), in effect or replaced, oldest first."""
        stacks = [self._stacks.get(name, [])] if name is not None else list(self._stacks.values())
        return sorted((e for stack in stacks for e in stack), key=lambda e: e.order)

    def get(self, name: str) -> Callable[..., Any]:
        """The gin-configurable factory registered under ``name``."""
        return self.entry(name).factory

    def names(self, pattern: str | None = None) -> list[str]:
        """Sorted names, optionally filtered by a glob such as ``"vq*"``."""
        names = sorted(self._stacks)
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

    def _unknown_message(self, name: object) -> str:
        names = sorted(self._stacks)
        close = difflib.get_close_matches(str(name), names, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        listing = ", ".join(names) if names else "(none: no plugin registered one)"
        return f"unknown {self.kind} {name!r}.{hint} Registered {plural(self.kind)}: {listing}."
