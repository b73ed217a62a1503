"""Read pickles of plain data (RefCOCO's ``refs(unc).p``, AttnGAN's ``filenames.pickle``)
without running code.

``pickle.load`` calls whatever callable a file names — a pickle from the internet can run
``os.system``. :func:`load_plain` admits only the builtin containers and scalars (list,
dict, tuple, set, str, bytes, int, float, bool, None): those need no global lookups at all,
and any ``GLOBAL``/``STACK_GLOBAL`` opcode (how a pickle names a class or function) is
refused with an error naming the file and the object it asked for. Python 2 pickles (the
RefCOCO files were written by Python 2) are read with ``encoding="latin1"`` by default.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

#: globals a plain-data pickle may name: only builtins that build containers/scalars
#: (protocol 2+ writes ``set``/``frozenset``/``bytearray`` as calls to these builtins;
#: ``copy_reg._reconstructor`` is never admitted).
_ALLOWED = {("builtins", n) for n in ("set", "frozenset", "bytearray", "list", "dict", "tuple",
                                      "str", "bytes", "int", "float", "bool", "complex")}
_ALLOWED |= {("__builtin__", n) for _, n in list(_ALLOWED)}  # Python 2 spelling
# Protocols 0-2 write bytes as _codecs.encode(text, "latin1"): str -> bytes, nothing else.
_CODECS_ENCODE = ("_codecs", "encode")


def _encode_text(text: str, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` restricted to str → bytes (what old protocols use for bytes)."""
    if not isinstance(text, str):
        raise UnsafePickleError("refused _codecs.encode of a non-string in a plain-data pickle")
    return text.encode(encoding)


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle asks for something other than plain data."""


class _PlainUnpickler(pickle.Unpickler):
    def __init__(self, file, path: str, **kwargs: Any):
        super().__init__(file, **kwargs)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class("builtins", name)
        if (module, name) == _CODECS_ENCODE:
            return _encode_text
        raise UnsafePickleError(
            f"{self._path}: refused to unpickle {module}.{name} — this file should hold only lists, "
            "dicts, strings and numbers; a pickle naming other objects can run code when loaded. "
            "Re-download the file from its official source.")

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self._path}: refused a persistent id in a plain-data pickle")


def loads_plain(data: bytes, path: str = "<bytes>", encoding: str = "latin1") -> Any:
    """:func:`load_plain` for bytes already in memory."""
    return _PlainUnpickler(io.BytesIO(data), path, encoding=encoding).load()


def load_plain(path: str | Path, encoding: str = "latin1") -> Any:
    """Unpickle ``path`` admitting only builtin containers and scalars.

    Raises:
        UnsafePickleError: the file names any other class or function (nothing it names is
            imported or called).
        pickle.UnpicklingError: the file is not a valid pickle.
    """
    with open(path, "rb") as fh:
        return _PlainUnpickler(fh, str(path), encoding=encoding).load()


__all__ = ["UnsafePickleError", "load_plain", "loads_plain"]
