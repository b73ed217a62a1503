"""Storage of the text-feature cache: rows in memory (a fixed pool of slots) and on disk
(safetensors shards, written atomically, read one row at a time).

Kept apart from :mod:`lgvq_plugins.text.cache`, which decides *what* is kept (the LRU and the
index); this module only knows how rows are laid out.
"""

from __future__ import annotations

import json
import os
import struct
import uuid
import warnings
from pathlib import Path
from typing import NamedTuple

import torch

FORMAT = "lgvq-text-cache-1"
#: tensors of a row, in :class:`Row` order, under their names in a shard
TENSORS = ("token_feats", "global_feat", "ids", "lengths", "special_mask")

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}


class Row(NamedTuple):
    """One caption's cached features (CPU; features fp32)."""

    token_feats: torch.Tensor  # (L, Dt)
    global_feat: torch.Tensor  # (Dg,)
    ids: torch.Tensor  # (L,) int64
    length: torch.Tensor  # () int64
    special_mask: torch.Tensor  # (L,) bool

    @property
    def nbytes(self) -> int:
        return sum(t.nelement() * t.element_size() for t in self)


class RowPool:
    """Rows in slots of a few preallocated tensors, one per field.

    One allocation per field instead of five per caption: memory is exactly the slots
    (nothing lost to allocator fragmentation as rows come and go), and untouched slots of a
    large pool cost nothing until used (the pages are only reserved). Unbounded pools
    (``capacity=None``) double when full.
    """

    def __init__(self, capacity: int | None) -> None:
        self.capacity = capacity
        self.tensors: list[torch.Tensor] | None = None
        self.row_bytes = 0

    @property
    def size(self) -> int:
        return 0 if self.tensors is None else self.tensors[0].shape[0]

    def _allocate(self, like: Row, size: int) -> None:
        fresh = [torch.empty((size, *t.shape), dtype=t.dtype) for t in like]
        if self.tensors is not None:
            for new, old in zip(fresh, self.tensors):
                new[:old.shape[0]] = old
        self.tensors = fresh
        self.row_bytes = like.nbytes

    def reserve(self, like: Row, slot: int) -> None:
        """Make ``slot`` exist (allocating the pool on the first row, growing it if unbounded)."""
        if self.tensors is None:
            self._allocate(like, self.capacity if self.capacity is not None else 1024)
        while slot >= self.size:
            if self.capacity is not None:
                raise IndexError(f"slot {slot} outside a pool of {self.capacity} rows")
            self._allocate(like, 2 * self.size)

    def put(self, slot: int, row: Row) -> None:
        self.reserve(row, slot)
        for dst, src in zip(self.tensors, row):
            dst[slot] = src

    def get(self, slot: int) -> Row:
        """Views of ``slot``: copy them before the slot can be reused."""
        return Row(*(t[slot] for t in self.tensors))


class ShardReader:
    """Reads single rows of a safetensors shard with ``os.pread``.

    Not a memory map on purpose: the pages of a mapped file touched by reads count in the
    process's resident memory, so a pass over a large data set would grow it by the whole
    cache; ``pread`` goes through the page cache, which the kernel reclaims as needed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self.data_start = 8 + size
        self.entries: dict[str, tuple[torch.dtype, list[int], int, int]] = {}
        for name, entry in header.items():
            begin, end = entry["data_offsets"]
            self.entries[name] = (_DTYPES[entry["dtype"]], list(entry["shape"]), begin, end)

    def _read(self, fd: int, offset: int, length: int) -> bytearray:
        data = bytearray(length)
        view, done = memoryview(data), 0
        while done < length:  # pread may return less than asked
            chunk = os.pread(fd, length - done, self.data_start + offset + done)
            if not chunk:
                raise OSError(f"{self.path}: unexpected end of file")
            view[done:done + len(chunk)] = chunk
            done += len(chunk)
        return data

    # The file is opened per read, not kept open: a large cache with a small memory bound
    # has thousands of shards, more than a process may hold open.
    def tensor(self, name: str) -> torch.Tensor:
        dtype, shape, begin, end = self.entries[name]
        fd = os.open(self.path, os.O_RDONLY)
        try:
            return _from_bytes(self._read(fd, begin, end - begin), dtype, shape)
        finally:
            os.close(fd)

    def row(self, index: int) -> Row:
        parts = []
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for name in TENSORS:
                dtype, shape, begin, end = self.entries[name]
                per_row = (end - begin) // shape[0]
                parts.append(_from_bytes(self._read(fd, begin + index * per_row, per_row), dtype, shape[1:]))
        finally:
            os.close(fd)
        return Row(*parts)


def _from_bytes(data: bytearray, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    if not data:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(data, dtype=dtype).reshape(shape)


class ShardWriter:
    """Rows computed but not yet on disk (key → pool slot), and the atomic write of a shard.

    Kept apart from the cache so that a finalizer can flush it without keeping the cache
    alive (it holds the pool, not the cache)."""

    def __init__(self, directory: Path | None, identity: str, max_length: int, pool: RowPool) -> None:
        self.directory = directory
        self.identity = identity
        self.max_length = max_length
        self.pool = pool
        self.pending: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.pending)

    def add(self, key: str, slot: int) -> None:
        if self.directory is not None:
            self.pending[key] = slot

    def flush(self) -> Path | None:
        """Write the pending rows to a new shard (atomically) and forget them."""
        if self.directory is None or not self.pending:
            return None
        keys = torch.frombuffer(bytearray(b"".join(bytes.fromhex(k) for k in self.pending)),
                                dtype=torch.uint8).reshape(len(self.pending), 32)
        metadata = {"format": FORMAT, "identity": self.identity, "max_length": str(self.max_length),
                    "rows": str(len(self.pending))}
        path = self.directory / f"features-{os.getpid()}-{uuid.uuid4().hex[:12]}.safetensors"
        tmp = path.with_name(path.name + ".tmp")  # not *.safetensors: never read half-written
        try:
            _write_shard(tmp, keys, self.pool, list(self.pending.values()), metadata)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        self.pending.clear()
        return path

    def flush_quietly(self) -> None:
        try:
            self.flush()
        except Exception as exc:  # noqa: BLE001 - at exit or in GC: say what was lost, don't raise
            warnings.warn(f"TextFeatureCache: could not save {len(self.pending)} pending caption "
                          f"features to {self.directory} ({exc})", stacklevel=1)


_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
_CHUNK = 256  # rows copied out of the pool per write


def _write_shard(path: Path, keys: torch.Tensor, pool: RowPool, slots: list[int],
                 metadata: dict[str, str]) -> None:
    """A safetensors file of ``keys`` and the pool's rows at ``slots``, streamed a chunk of
    rows at a time: writing a shard never holds a second copy of the pending rows (which
    would take memory outside the cache's bound)."""
    names = ("keys", *TENSORS)
    shapes = [list(keys.shape)] + [[len(slots), *t.shape[1:]] for t in pool.tensors]
    dtypes = [keys.dtype] + [t.dtype for t in pool.tensors]
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, shape, dtype in zip(names, shapes, dtypes):
        size = dtype.itemsize
        for dim in shape:
            size *= dim
        header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        f.write(keys.numpy().tobytes())
        for tensor in pool.tensors:
            for start in range(0, len(slots), _CHUNK):
                index = torch.tensor(slots[start:start + _CHUNK], dtype=torch.long)
                f.write(tensor.index_select(0, index).numpy().tobytes())
        f.flush()
        os.fsync(f.fileno())


__all__ = ["FORMAT", "TENSORS", "Row", "RowPool", "ShardReader", "ShardWriter"]
