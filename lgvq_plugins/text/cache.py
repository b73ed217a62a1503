"""Run the frozen text encoder once per unique caption: an in-memory plus on-disk feature cache.

The reference implementation re-encodes every caption at every step (twice, with two
optimizers). The encoder is frozen and in eval mode, so a caption's features never change:
:class:`TextFeatureCache` encodes each caption once, keeps one row per caption (fp32, CPU)
and assembles batches from those rows.

On disk (optional ``cache_dir``) rows are stored in safetensors shards under a folder named
for the encoder's ``identity`` and ``max_length``; every shard also records both in its
metadata and is ignored unless they match, so features of other weights or another caption
length are never used. Shards are written atomically (temporary file + ``os.replace``) and
never modified afterwards, so several processes (DDP ranks) may share a folder: each writes
its own shards, and each sees the others' shards the next time a cache is constructed.

Memory is bounded (``max_memory_mb``, 1024 MiB by default, settable in gin as
``TextFeatureCache.max_memory_mb``): rows live in an LRU over the on-disk shards. A row
evicted from memory is read back from its shard when needed (one ``pread`` of that row, not
a memory map, so reading a whole data set does not grow the process's resident memory);
without ``cache_dir`` it is encoded again. Rows not yet written are never evicted before
they are: the pending rows are flushed to a shard first. Beyond the bound the cache holds an
index of ≈ 0.3 KB per caption on disk (≈ 90 MB for 300k captions).

The cache is a plain object, not an ``nn.Module``: it is never part of a ``state_dict``.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import uuid
import warnings
import weakref
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, NamedTuple

import gin
import torch
from safetensors.torch import save_file

from lgvq_plugins.interfaces import TextEncoder, TextFeatures, TextTokens

FORMAT = "lgvq-text-cache-1"
_TENSORS = ("token_feats", "global_feat", "ids", "lengths", "special_mask")

#: default bound of the in-memory rows, MiB (≈ 22k MiniLM captions of 30 tokens; ≈ 6.5k of
#: CLIP's 77 tokens). Per process: every DDP rank holds its own cache.
DEFAULT_MAX_MEMORY_MB = 1024.0


class _Row(NamedTuple):
    """One caption's cached features (CPU; features fp32)."""

    token_feats: torch.Tensor  # (L, Dt)
    global_feat: torch.Tensor  # (Dg,)
    ids: torch.Tensor  # (L,) int64
    length: torch.Tensor  # () int64
    special_mask: torch.Tensor  # (L,) bool

    @property
    def nbytes(self) -> int:
        return sum(t.nelement() * t.element_size() for t in self)


@dataclass
class CacheStats:
    """Counters since the cache was made. Hits and misses count the *unique* captions of
    each request, so a caption repeated within a batch is looked up (and encoded) once."""

    hits: int = 0  # served from memory or disk
    disk_hits: int = 0  # of which read from a disk shard
    misses: int = 0  # had to be encoded
    encoder_calls: int = 0  # batched calls of encoder.encode
    captions_encoded: int = 0  # captions passed to the encoder in total
    shards_written: int = 0
    evictions: int = 0  # rows dropped from memory to stay under the bound
    memory_rows: int = 0  # rows in memory now
    memory_bytes: int = 0  # their size now
    peak_memory_bytes: int = 0  # the most they ever took

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@gin.configurable(denylist=["encoder", "cache_dir"])
class TextFeatureCache:
    """Frozen text features per caption, computed once.

    Args:
        encoder: a frozen :class:`~lgvq_plugins.interfaces.TextEncoder`.
        cache_dir: folder for the on-disk cache (created if needed); ``None`` keeps
            features in memory only. Shards already there for this encoder are used.
        flush_every: write pending rows to a new shard once this many have accumulated
            (they are also written by :meth:`save`, on ``with`` exit, and when the cache is
            garbage-collected or the interpreter exits).
        max_memory_mb: keep at most this many MiB of rows in memory (least recently used
            are dropped; with a disk cache they are read back from disk when needed, without
            it they are encoded again). ``None``: no limit (every caption stays in RAM).
        max_memory_rows: also keep at most this many rows. ``None``: no row limit.

    Example::

        cache = TextFeatureCache(encoder, cache_dir="runs/text_cache")
        cache.warm(all_captions, batch_size=256)   # optional: encode a data set up front
        feats = cache(batch["caption"], device)     # TextFeatures on ``device``
    """

    def __init__(
        self,
        encoder: TextEncoder,
        cache_dir: str | os.PathLike[str] | None = None,
        *,
        flush_every: int = 4096,
        max_memory_mb: float | None = DEFAULT_MAX_MEMORY_MB,
        max_memory_rows: int | None = None,
    ) -> None:
        if flush_every < 1:
            raise ValueError(f"TextFeatureCache: flush_every={flush_every} must be at least 1")
        if max_memory_rows is not None and max_memory_rows < 1:
            raise ValueError(f"TextFeatureCache: max_memory_rows={max_memory_rows} must be at least 1 or None")
        if max_memory_mb is not None and not max_memory_mb > 0:
            raise ValueError(f"TextFeatureCache: max_memory_mb={max_memory_mb} must be > 0 or None "
                             "(TextFeatureCache.max_memory_mb in gin)")
        self.encoder = encoder
        self.identity = str(encoder.identity)
        self.max_length = int(encoder.max_length)
        self.flush_every = int(flush_every)
        self.max_memory_rows = max_memory_rows
        self.max_memory_bytes = None if max_memory_mb is None else int(max_memory_mb * 2**20)
        self._stats = CacheStats()
        self._memory: OrderedDict[str, _Row] = OrderedDict()
        self._memory_bytes = 0
        self._disk_index: dict[str, tuple[int, int]] = {}  # key -> (shard, row)
        self._shards: list[_ShardReader] = []
        self.directory: Path | None = None
        if cache_dir is not None:
            namespace = hashlib.sha256(f"{self.identity}\n{self.max_length}".encode()).hexdigest()[:16]
            self.directory = Path(cache_dir) / namespace
            self.directory.mkdir(parents=True, exist_ok=True)
            self._load_shards()
        self._writer = _ShardWriter(self.directory, self.identity, self.max_length)
        # Rows not yet on disk are written when the cache is garbage-collected or the
        # interpreter exits, whichever comes first; the writer holds no reference to the
        # cache, so this does not keep it alive.
        weakref.finalize(self, self._writer.flush_quietly)

    # -- keys -------------------------------------------------------------------------
    def key(self, caption: str) -> str:
        """sha256 of (encoder identity, max_length, caption) as hex."""
        text = f"{self.identity}\n{self.max_length}\n{caption}"
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def __contains__(self, caption: object) -> bool:
        if not isinstance(caption, str):
            return False
        return self._known(self.key(caption))

    def __len__(self) -> int:
        """Number of distinct captions available (memory and disk)."""
        return len(self._disk_index.keys() | self._memory.keys() | self._writer.pending.keys())

    @property
    def stats(self) -> CacheStats:
        """A snapshot of the counters."""
        self._stats.memory_rows, self._stats.memory_bytes = len(self._memory), self._memory_bytes
        return CacheStats(**asdict(self._stats))

    # -- main API ---------------------------------------------------------------------
    def cache(self, captions: list[str], device: torch.device | str | None = None) -> TextFeatures:
        """Features of ``captions`` (in order, duplicates allowed) on ``device``.

        Cached captions are served from memory or disk; the others are encoded in *one*
        batched encoder call (each distinct caption once). Features are the encoder's
        unmasked output in fp32.
        """
        captions = list(captions)
        if not captions:
            raise ValueError("TextFeatureCache.cache: got an empty list of captions")
        for i, caption in enumerate(captions):
            if not isinstance(caption, str):  # never encode str(None) or str(3) as a caption
                raise TypeError(f"TextFeatureCache.cache: caption at position {i} is "
                                f"{type(caption).__name__} {caption!r}, not a string")
        keys = [self.key(c) for c in captions]
        unique = dict(zip(keys, captions))  # first occurrence wins; order kept
        rows: dict[str, _Row] = {}
        missing: dict[str, str] = {}
        for key, caption in unique.items():
            row = self._lookup(key)
            if row is None:
                missing[key] = caption
            else:
                rows[key] = row
        self._stats.hits += len(rows)
        self._stats.misses += len(missing)
        if missing:
            rows.update(self._encode(list(missing.keys()), list(missing.values())))
        features = _assemble([rows[k] for k in keys])
        self._trim_memory()
        return features.to(device) if device is not None else features

    __call__ = cache

    def warm(self, captions: Iterable[str], batch_size: int = 256, progress: bool = False) -> int:
        """Encode every caption not cached yet, ``batch_size`` at a time; then :meth:`save`.

        Returns the number of captions encoded. Use it before training to pre-encode a
        data set (e.g. on every rank, or on one rank followed by a barrier).
        """
        if batch_size < 1:
            raise ValueError(f"TextFeatureCache.warm: batch_size={batch_size} must be at least 1")
        todo: dict[str, str] = {}
        for i, caption in enumerate(captions):
            if not isinstance(caption, str):
                raise TypeError(f"TextFeatureCache.warm: caption number {i} is "
                                f"{type(caption).__name__} {caption!r}, not a string")
            key = self.key(caption)
            if not self._known(key):
                todo.setdefault(key, caption)
        items = list(todo.items())
        starts = range(0, len(items), batch_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="encoding captions", unit="batch")
        for start in starts:
            chunk = items[start:start + batch_size]
            self._stats.misses += len(chunk)
            self._encode([k for k, _ in chunk], [c for _, c in chunk])
            self._trim_memory()
        self.save()
        return len(items)

    def save(self) -> Path | None:
        """Write the rows computed since the last save to a new shard (atomically).

        Returns the shard's path, or None when there was nothing to write or no ``cache_dir``.
        """
        keys = list(self._writer.pending)
        path = self._writer.flush()
        if path is not None:
            # index the new shard from what was just written (no need to read its keys back)
            shard = len(self._shards)
            self._shards.append(_ShardReader(path))
            for row, key in enumerate(keys):
                self._disk_index.setdefault(key, (shard, row))
            self._stats.shards_written += 1
        return path

    def __enter__(self) -> "TextFeatureCache":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.save()

    def __repr__(self) -> str:
        where = str(self.directory) if self.directory is not None else "memory only"
        return (f"TextFeatureCache(identity={self.identity!r}, max_length={self.max_length}, "
                f"captions={len(self)}, {where})")

    # -- internals --------------------------------------------------------------------
    def _known(self, key: str) -> bool:
        return key in self._memory or key in self._disk_index or key in self._writer.pending

    def _lookup(self, key: str) -> _Row | None:
        row = self._memory.get(key)
        if row is not None:
            self._memory.move_to_end(key)
            return row
        where = self._disk_index.get(key)
        if where is None:
            return None
        shard, index = where
        row = self._shards[shard].row(index)
        self._remember(key, row)
        self._stats.disk_hits += 1
        return row

    def _remember(self, key: str, row: _Row) -> None:
        self._memory[key] = row
        self._memory_bytes += row.nbytes
        self._stats.peak_memory_bytes = max(self._stats.peak_memory_bytes, self._memory_bytes)

    def _encode(self, keys: list[str], captions: list[str]) -> dict[str, _Row]:
        tokens = self.encoder.tokenize(captions)
        device = _module_device(self.encoder)
        if device is not None:  # the built-ins move tokens themselves; a third party may not
            tokens = tokens.to(device)
        features = self.encoder.encode(tokens)
        self._stats.encoder_calls += 1
        self._stats.captions_encoded += len(captions)
        token_feats = features.token_feats.detach().float().cpu()
        global_feat = features.global_feat.detach().float().cpu()
        t = features.tokens.to("cpu")
        new: dict[str, _Row] = {}
        for i, key in enumerate(keys):
            # clone: a row must not keep the whole batch's storage alive once others are evicted
            row = _Row(token_feats[i].clone(), global_feat[i].clone(), t.ids[i].long().clone(),
                       t.lengths[i].long().clone(), t.special_mask[i].bool().clone())
            new[key] = row
            self._remember(key, row)
            self._writer.add(key, row)
        if len(self._writer) >= self.flush_every:
            self.save()
        return new

    def _over_bound(self) -> bool:
        if self.max_memory_rows is not None and len(self._memory) > self.max_memory_rows:
            return True
        return self.max_memory_bytes is not None and self._memory_bytes > self.max_memory_bytes

    def _trim_memory(self) -> None:
        """Drop least recently used rows until under the bound. A row still waiting for the
        writer is written first (all pending rows, in one shard), so nothing is lost and the
        pending rows never sit outside the bound."""
        while len(self._memory) > 1 and self._over_bound():
            key = next(iter(self._memory))
            if key in self._writer.pending:
                self.save()
            row = self._memory.pop(key)
            self._memory_bytes -= row.nbytes
            self._stats.evictions += 1

    def _load_shards(self) -> None:
        assert self.directory is not None
        for path in sorted(self.directory.glob("*.safetensors")):
            try:
                self._open_shard(path)
            except Exception as exc:  # noqa: BLE001 - a damaged shard only costs re-encoding
                warnings.warn(f"TextFeatureCache: skipping unreadable shard {path} ({exc})", stacklevel=3)

    def _open_shard(self, path: Path) -> None:
        reader = _ShardReader(path)
        meta = reader.metadata
        if (meta.get("format") != FORMAT or meta.get("identity") != self.identity
                or meta.get("max_length") != str(self.max_length)):
            return  # another encoder's (or length's) features: never used
        keys = reader.tensor("keys")
        shard = len(self._shards)
        self._shards.append(reader)
        for row, digest in enumerate(keys.numpy()):
            self._disk_index.setdefault(digest.tobytes().hex(), (shard, row))


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}


class _ShardReader:
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
        self._file = open(path, "rb")  # noqa: SIM115 - kept open for the reader's lifetime

    def _read(self, offset: int, length: int) -> bytearray:
        data = bytearray(length)
        view, done = memoryview(data), 0
        while done < length:  # pread may return less than asked
            chunk = os.pread(self._file.fileno(), length - done, self.data_start + offset + done)
            if not chunk:
                raise OSError(f"{self.path}: unexpected end of file")
            view[done:done + len(chunk)] = chunk
            done += len(chunk)
        return data

    def tensor(self, name: str) -> torch.Tensor:
        dtype, shape, begin, end = self.entries[name]
        return _from_bytes(self._read(begin, end - begin), dtype, shape)

    def row(self, index: int) -> _Row:
        parts = []
        for name in _TENSORS:
            dtype, shape, begin, end = self.entries[name]
            per_row = (end - begin) // shape[0]
            parts.append(_from_bytes(self._read(begin + index * per_row, per_row), dtype, shape[1:]))
        return _Row(*parts)


def _from_bytes(data: bytearray, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    if not data:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(data, dtype=dtype).reshape(shape)


def _module_device(encoder: Any) -> torch.device | None:
    if isinstance(encoder, torch.nn.Module):
        param = next(encoder.parameters(), None)
        if param is not None:
            return param.device
    return None


def _assemble(rows: list[_Row]) -> TextFeatures:
    tokens = TextTokens(
        ids=torch.stack([r.ids for r in rows]),
        lengths=torch.stack([r.length for r in rows]),
        special_mask=torch.stack([r.special_mask for r in rows]),
    )
    return TextFeatures(
        token_feats=torch.stack([r.token_feats for r in rows]),
        global_feat=torch.stack([r.global_feat for r in rows]),
        tokens=tokens,
    )


class _ShardWriter:
    """Rows computed but not yet on disk, and the atomic write of a shard.

    Kept apart from the cache so that a finalizer can flush it without keeping the cache
    alive."""

    def __init__(self, directory: Path | None, identity: str, max_length: int) -> None:
        self.directory = directory
        self.identity = identity
        self.max_length = max_length
        self.pending: dict[str, _Row] = {}

    def __len__(self) -> int:
        return len(self.pending)

    def add(self, key: str, row: _Row) -> None:
        if self.directory is not None:
            self.pending[key] = row

    def flush(self) -> Path | None:
        if self.directory is None or not self.pending:
            return None
        keys = list(self.pending)
        rows = list(self.pending.values())
        tensors = {
            "keys": torch.frombuffer(bytearray(b"".join(bytes.fromhex(k) for k in keys)),
                                     dtype=torch.uint8).reshape(len(keys), 32),
            "token_feats": torch.stack([r.token_feats for r in rows]),
            "global_feat": torch.stack([r.global_feat for r in rows]),
            "ids": torch.stack([r.ids for r in rows]),
            "lengths": torch.stack([r.length for r in rows]),
            "special_mask": torch.stack([r.special_mask for r in rows]),
        }
        metadata = {"format": FORMAT, "identity": self.identity, "max_length": str(self.max_length),
                    "rows": str(len(keys))}
        path = self.directory / f"features-{os.getpid()}-{uuid.uuid4().hex[:12]}.safetensors"
        tmp = path.with_name(path.name + ".tmp")  # not *.safetensors: never read half-written
        try:
            save_file(tensors, str(tmp), metadata=metadata)
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
