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
``TextFeatureCache.max_memory_mb``): rows live in a fixed pool of slots with least-recently
used eviction, over the on-disk shards. A row evicted from memory is read back from its
shard when needed (one ``pread`` of that row, not a memory map, so reading a whole data set
does not grow the process's resident memory); without ``cache_dir`` it is encoded again.
Rows not yet written are never evicted before they are: the pending rows are flushed to a
shard first, streamed from the pool (no second copy). Beyond the bound the cache holds an
index of ≈ 0.3 KB per caption on disk (≈ 90 MB for 300k captions).

The cache is a plain object, not an ``nn.Module``: it is never part of a ``state_dict``.
"""

from __future__ import annotations

import hashlib
import os
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

import gin
from lgvq_plugins.interfaces import TextEncoder, TextFeatures, TextTokens
from lgvq_plugins.text.shards import FORMAT, Row, RowPool, ShardReader, ShardWriter

#: default bound of the in-memory rows, MiB (≈ 22k MiniLM captions of 30 tokens; ≈ 6.5k of
#: CLIP's 77 tokens). Per process: every DDP rank holds its own cache.
DEFAULT_MAX_MEMORY_MB = 1024.0


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
            (they are also written by :meth:`save`, on ``with`` exit, before a pending row
            would be evicted, and when the cache is garbage-collected or the interpreter
            exits). Pending rows live in the bounded pool; a shard is streamed from there.
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
        self._memory: OrderedDict[str, int] = OrderedDict()  # key -> pool slot, least recent first
        self._pool = RowPool(None)  # capacity set from the first row's size
        self._disk_index: dict[str, tuple[int, int]] = {}  # key -> (shard, row)
        self._shards: list[ShardReader] = []
        self.directory: Path | None = None
        if cache_dir is not None:
            namespace = hashlib.sha256(f"{self.identity}\n{self.max_length}".encode()).hexdigest()[:16]
            self.directory = Path(cache_dir) / namespace
            self.directory.mkdir(parents=True, exist_ok=True)
            self._load_shards()
        self._writer = ShardWriter(self.directory, self.identity, self.max_length, self._pool)
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
        return len(self._disk_index.keys() | self._memory.keys())

    @property
    def stats(self) -> CacheStats:
        """A snapshot of the counters."""
        self._stats.memory_rows = len(self._memory)
        self._stats.memory_bytes = len(self._memory) * self._pool.row_bytes
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
        position = {key: u for u, key in enumerate(unique)}
        out: list[torch.Tensor] | None = None
        missing: list[str] = []
        for key in unique:
            row = self._lookup(key)
            if row is None:
                missing.append(key)
            else:  # copied at once: a later lookup may reuse this row's slot
                out = _place(out, position[key], row, len(unique))
        self._stats.hits += len(unique) - len(missing)
        self._stats.misses += len(missing)
        if missing:
            for key, row in zip(missing, self._encode(missing, [unique[k] for k in missing])):
                out = _place(out, position[key], row, len(unique))
        index = torch.tensor([position[k] for k in keys], dtype=torch.long)
        token_feats, global_feat, ids, lengths, special = (t.index_select(0, index) for t in out)
        features = TextFeatures(token_feats=token_feats, global_feat=global_feat,
                                tokens=TextTokens(ids=ids, lengths=lengths, special_mask=special))
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
            self._shards.append(ShardReader(path))
            for row, key in enumerate(keys):
                self._disk_index.setdefault(key, (shard, row))
            self._stats.shards_written += 1
        return path

    def __enter__(self) -> TextFeatureCache:  # noqa: PYI034 - typing.Self needs Python 3.11
        return self

    def __exit__(self, *exc: object) -> None:
        self.save()

    def __repr__(self) -> str:
        where = str(self.directory) if self.directory is not None else "memory only"
        return (f"TextFeatureCache(identity={self.identity!r}, max_length={self.max_length}, "
                f"captions={len(self)}, {where})")

    # -- internals --------------------------------------------------------------------
    def _known(self, key: str) -> bool:
        return key in self._memory or key in self._disk_index

    def _lookup(self, key: str) -> Row | None:
        slot = self._memory.get(key)
        if slot is not None:
            self._memory.move_to_end(key)
            return self._pool.get(slot)
        where = self._disk_index.get(key)
        if where is None:
            return None
        shard, index = where
        row = self._shards[shard].row(index)
        self._remember(key, row)
        self._stats.disk_hits += 1
        return row

    def _capacity(self, row: Row) -> int | None:
        """Rows the bound allows (at least one), or None without a bound."""
        limits = [self.max_memory_rows] if self.max_memory_rows is not None else []
        if self.max_memory_bytes is not None:
            limits.append(self.max_memory_bytes // row.nbytes)
        return max(1, min(limits)) if limits else None

    def _remember(self, key: str, row: Row) -> int:
        """Put ``row`` in a slot (evicting the least recently used row when full)."""
        if self._pool.tensors is None:
            self._pool.capacity = self._capacity(row)
        if self._pool.capacity is None or len(self._memory) < self._pool.capacity:
            slot = len(self._memory)  # slots fill in order; once full, an eviction frees one
        else:
            slot = self._evict()
        self._pool.put(slot, row)
        self._memory[key] = slot
        in_memory = len(self._memory) * self._pool.row_bytes
        self._stats.peak_memory_bytes = max(self._stats.peak_memory_bytes, in_memory)
        return slot

    def _evict(self) -> int:
        """Drop the least recently used row and return its slot. A row still waiting for the
        writer is written first (all pending rows, in one shard), so nothing is lost."""
        key = next(iter(self._memory))
        if key in self._writer.pending:
            self.save()
        self._stats.evictions += 1
        return self._memory.pop(key)

    def _encode(self, keys: list[str], captions: list[str]) -> list[Row]:
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
        rows = [Row(token_feats[i], global_feat[i], t.ids[i].long(), t.lengths[i].long(),
                    t.special_mask[i].bool()) for i in range(len(keys))]
        for key, row in zip(keys, rows):
            self._writer.add(key, self._remember(key, row))
            if len(self._writer) >= self.flush_every:
                self.save()
        return rows

    def _load_shards(self) -> None:
        assert self.directory is not None
        for path in sorted(self.directory.glob("*.safetensors")):
            try:
                self._open_shard(path)
            except Exception as exc:  # noqa: BLE001 - a damaged shard only costs re-encoding
                warnings.warn(f"TextFeatureCache: skipping unreadable shard {path} ({exc})", stacklevel=3)

    def _open_shard(self, path: Path) -> None:
        reader = ShardReader(path)
        meta = reader.metadata
        if (meta.get("format") != FORMAT or meta.get("identity") != self.identity
                or meta.get("max_length") != str(self.max_length)):
            return  # another encoder's (or length's) features: never used
        keys = reader.tensor("keys")
        shard = len(self._shards)
        self._shards.append(reader)
        for row, digest in enumerate(keys.numpy()):
            self._disk_index.setdefault(digest.tobytes().hex(), (shard, row))


def _module_device(encoder: Any) -> torch.device | None:
    if isinstance(encoder, torch.nn.Module):
        param = next(encoder.parameters(), None)
        if param is not None:
            return param.device
    return None


def _place(out: list[torch.Tensor] | None, position: int, row: Row, total: int) -> list[torch.Tensor]:
    """Copy ``row`` into row ``position`` of the batch tensors (made on the first row)."""
    if out is None:
        out = [torch.empty((total, *t.shape), dtype=t.dtype) for t in row]
    for dst, src in zip(out, row):
        dst[position] = src
    return out


__all__ = ["DEFAULT_MAX_MEMORY_MB", "CacheStats", "TextFeatureCache"]
