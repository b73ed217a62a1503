"""The public registry API: ``register_*`` decorators, ``create_*`` and ``list_*`` per kind.

Kept apart from the package ``__init__`` so that modules inside the package can use it without
importing the package that re-exports them (no import circles).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, TypeVar

from lgvq_plugins.plugins import get_host
from lgvq_plugins.registry import Origin, plural

F = TypeVar("F", bound=Callable[..., Any])


def registry(kind: str):
    """The :class:`~lgvq_plugins.registry.Registry` of one kind (plugins loaded first)."""
    return get_host().registries[kind]


def register(kind: str, name: str | None = None, *, exist_ok: bool = False) -> Callable[[F], F]:
    """Decorator: register a class or function as a component of ``kind`` under ``name``
    (default: its ``__name__``). Returns the gin-configurable wrapper, so bindings apply
    whether it is created by name or called directly.

    It may run before any plugin has loaded (plugins load on first use). Code registrations
    take precedence over plugins and built-ins: with ``exist_ok=True`` this one replaces a
    built-in or plugin component of the same name, whichever registers first; without it a
    clash is a :class:`~lgvq_plugins.registry.DuplicateComponentError` naming both.
    """

    def decorate(factory: F) -> F:
        module = inspect.getmodule(factory)
        source = f"code:{module.__name__ if module else '?'}.{getattr(factory, '__qualname__', factory)}"
        host = get_host(load=False)
        return host.registries[kind].add(name or factory.__name__, factory, source=source,
                                         exist_ok=exist_ok, origin=Origin.CODE)

    return decorate


def create(kind: str, name: str, /, **kwargs: Any) -> Any:
    """Build the component ``name`` of ``kind``; ``None`` keyword values are dropped."""
    return registry(kind).create(name, **kwargs)


def list_components(kind: str, pattern: str | None = None) -> list[str]:
    """Registered names of ``kind``, optionally filtered by a glob."""
    return registry(kind).names(pattern)


def _make_kind_api(kind: str) -> tuple[Callable, Callable, Callable]:
    def register_kind(name: str | None = None, *, exist_ok: bool = False):
        return register(kind, name, exist_ok=exist_ok)

    def create_kind(name: str, /, **kwargs: Any) -> Any:
        return create(kind, name, **kwargs)

    def list_kind(pattern: str | None = None) -> list[str]:
        return list_components(kind, pattern)

    register_kind.__doc__ = f'Decorator: ``@register_{kind}("name")`` registers a {kind}.'
    create_kind.__doc__ = f"Create the {kind} registered as ``name`` with ``kwargs``."
    list_kind.__doc__ = f"Names of registered {plural(kind)}, optionally filtered by a glob."
    return register_kind, create_kind, list_kind


register_quantizer, create_quantizer, list_quantizers = _make_kind_api("quantizer")
register_backbone, create_backbone, list_backbones = _make_kind_api("backbone")
register_text_encoder, create_text_encoder, list_text_encoders = _make_kind_api("text_encoder")
register_alignment_loss, create_alignment_loss, list_alignment_losses = _make_kind_api("alignment_loss")
register_perceptual_loss, create_perceptual_loss, list_perceptual_losses = _make_kind_api("perceptual_loss")
register_dataset, create_dataset, list_datasets = _make_kind_api("dataset")
register_task, create_task, list_tasks = _make_kind_api("task")
register_metric, create_metric, list_metrics = _make_kind_api("metric")
