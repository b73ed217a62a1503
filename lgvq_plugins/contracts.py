"""Check an object against a contract of :mod:`lgvq_plugins.interfaces` where it is used.

``isinstance(obj, SomeProtocol)`` with a ``runtime_checkable`` protocol answers yes or no
and stops at presence; it does not say *what* is missing, and a model that lacks ``grid``
then fails much later with ``AttributeError: grid``. :func:`check_implements` lists every
missing member at once — with what each one is for, read from the protocol's own
docstrings — and looks inside members that are themselves contracts (a tokenizer's
``quantizer`` must meet ``Quantizer``)::

    check_implements(tokenizer, Tokenizer, role="Trainer's model.tokenizer")
"""

from __future__ import annotations

import functools
import inspect
import re
import typing
from dataclasses import dataclass
from typing import Any, Protocol

from torch import nn

__all__ = ["ContractError", "Member", "check_implements", "missing_members", "protocol_members"]


class ContractError(TypeError):
    """An object lacks members of the contract it is used under; ``missing`` lists them
    (dotted for nested contracts, e.g. ``quantizer.codebook``)."""

    def __init__(self, message: str, missing: list[str]):
        super().__init__(message)
        self.missing = missing


@dataclass(frozen=True)
class Member:
    """One member of a protocol: ``kind`` is ``"method"``, ``"property"`` or ``"attribute"``;
    ``protocol`` is set when the attribute's annotation is itself a runtime protocol."""

    name: str
    kind: str
    doc: str
    signature: str = ""
    protocol: type | None = None


def _is_protocol(cls: Any) -> bool:
    return isinstance(cls, type) and bool(getattr(cls, "_is_protocol", False)) and cls is not Protocol


def _plain(text: str) -> str:
    """reST roles and double backquotes read as plain text in an error message."""
    return re.sub(r":\w+:`~?([^`]+)`", r"\1", text).replace("``", "`")


def _first_sentence(doc: str | None) -> str:
    return _plain(" ".join(inspect.cleandoc(doc or "").split("\n\n", 1)[0].split()))


def _attribute_docs(cls: type) -> dict[str, str]:
    """``name: text`` entries of the ``Attributes:`` section of ``cls``'s docstring."""
    doc = inspect.cleandoc(cls.__dict__.get("__doc__") or "")
    section = doc.split("Attributes:", 1)[1] if "Attributes:" in doc else ""
    docs: dict[str, str] = {}
    current = None
    for line in section.splitlines():
        match = re.match(r"^ {4}(\w+): (.*)$", line)
        if match:
            current = match.group(1)
            docs[current] = match.group(2).strip()
        elif current and line.startswith(" " * 8):
            docs[current] += " " + line.strip()
        elif line.strip():
            break  # the next section
    return {name: _plain(text) for name, text in docs.items()}


def _signature(name: str, fn: Any) -> str:
    try:
        params = [p for p in inspect.signature(fn).parameters if p != "self"]
    except (TypeError, ValueError):
        return f"{name}(...)"
    return f"{name}({', '.join(params)})"


@functools.cache
def protocol_members(protocol: type) -> dict[str, Member]:
    """The members ``protocol`` asks for, base protocols' first, in declaration order.

    Public names and ``__call__`` count; typing's own machinery does not. Written out here
    because typing's list of protocol attributes is private. Cached: treat it as read-only.
    """
    if not _is_protocol(protocol):
        raise TypeError(f"{protocol!r} is not a typing.Protocol")
    try:
        hints = typing.get_type_hints(protocol)
    except Exception:  # noqa: BLE001 - an unresolvable annotation only loses nesting
        hints = {}
    members: dict[str, Member] = {}
    for cls in reversed(protocol.__mro__):
        if not _is_protocol(cls):
            continue
        attr_docs = _attribute_docs(cls)
        annotations = inspect.get_annotations(cls)
        names = list(annotations) + list(cls.__dict__)
        for name in names:
            if name in members or (name.startswith("_") and name != "__call__"):
                continue
            value = cls.__dict__.get(name)
            if isinstance(value, property):
                members[name] = Member(name, "property", _first_sentence(value.__doc__))
            elif inspect.isfunction(value):
                members[name] = Member(name, "method", _first_sentence(value.__doc__), _signature(name, value))
            elif name in annotations:
                nested = hints.get(name)
                members[name] = Member(name, "attribute", attr_docs.get(name, ""),
                                       protocol=nested if _is_protocol(nested) else None)
    return members


def _lacks(obj: Any, member: Member) -> str | None:
    """Why ``obj`` does not provide ``member`` (None when it does)."""
    if member.name == "__call__" and isinstance(obj, nn.Module):
        # every nn.Module has __call__; what it calls is forward
        if type(obj).forward is nn.Module.forward:
            return "missing (an nn.Module needs forward())"
        return None
    try:
        value = getattr(obj, member.name)
    except AttributeError:
        return "missing"
    except Exception as exc:  # noqa: BLE001 - a property that fails is as good as missing
        return f"reading it raised {type(exc).__name__}: {exc}"
    if member.kind == "method" and not callable(value):
        return f"is a {type(value).__name__}, expected a method"
    return None


def missing_members(obj: Any, protocol: type, prefix: str = "") -> list[tuple[str, str, Member]]:
    """``(dotted name, why, member)`` for every member of ``protocol`` that ``obj`` lacks,
    descending into members whose annotation is itself a protocol."""
    missing: list[tuple[str, str, Member]] = []
    for member in protocol_members(protocol).values():
        why = _lacks(obj, member)
        if why is not None:
            missing.append((prefix + member.name, why, member))
        elif member.protocol is not None:
            missing += missing_members(getattr(obj, member.name), member.protocol, f"{prefix}{member.name}.")
    return missing


def _describe(name: str, why: str, member: Member) -> str:
    label = member.signature.replace(member.name, name, 1) if member.signature else name
    if member.name == "__call__":
        label = name.replace("__call__", "__call__/forward") + member.signature[len("__call__"):]
    text = f"  - {label}: {why}"
    return text + (f" — {member.doc}" if member.doc else "")


def check_implements(obj: Any, protocol: type, role: str) -> Any:
    """Return ``obj`` if it has every member of ``protocol``; else raise one
    :class:`ContractError` listing each missing member and what it is for.

    Args:
        obj: the object to check.
        protocol: a ``typing.Protocol`` class from :mod:`lgvq_plugins.interfaces`.
        role: where ``obj`` is used, for the message (e.g. ``"LanguageGuided(tokenizer=...)"``).
    """
    missing = missing_members(obj, protocol)
    if not missing:
        return obj
    where = f"{protocol.__module__}.{protocol.__qualname__}"
    lines = [(f"{role}: {type(obj).__module__}.{type(obj).__qualname__} does not meet the "
              f"{protocol.__name__} contract ({where}); it lacks {len(missing)} member(s):")]
    lines += [_describe(*entry) for entry in missing]
    lines.append("Add them, or wrap the object in a thin adapter (lgvq_plugins.adapters; "
                 "docs/architecture.md, 'A foreign tokenizer', shows one for taming's VQModel).")
    raise ContractError("\n".join(lines), [name for name, _, _ in missing])
