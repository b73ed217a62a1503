"""``webdataset``: image–caption samples streamed from tar shards (the ``webdataset`` package),
for corpora that do not fit on one disk or in one epoch's memory.

    create_dataset("webdataset", urls="/data/laion/{000000..000999}.tar", split="train", size=256)

Each sample in a shard is a group of files sharing a key: an image (``.jpg``, ``.jpeg``,
``.png``, ``.webp``) and a caption, either ``.txt`` (one caption per line) or ``.json``
(``{"caption": "..."}`` or ``{"captions": [...]}``). Shards are split across ranks, then
across each rank's DataLoader workers (shard ``i`` of the epoch's order goes to rank
``i % world`` and, within the rank, to worker ``(i // world) % workers``), so one epoch reads
every sample exactly once when the shard count is a multiple of ranks × workers (otherwise
some workers read one shard fewer: still each sample at most once). ``set_epoch``
reshuffles the shard order, identically on every rank.

It is an ``IterableDataset``. The ``Trainer`` trains on it through
:mod:`lgvq_plugins.training.stream`: every sample carries its place in the stream,
``stream_pos`` = (worker, shard slot, member), which the trainer records for the batches
it consumed; :meth:`WebDatasetCaptions.set_stream_start` makes a resumed run start each
worker right after them, skipping whole shards without reading them (see docs/data.md).
Bad samples are counted in shared memory, so the ones DataLoader workers meet count too.
"""

from __future__ import annotations

import io
import json
import os
import random
import zlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import webdataset as wds
from braceexpand import braceexpand
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from lgvq_plugins.data.bad_samples import (
    CONVERTED,
    BadSampleError,
    SharedProblemTally,
    merge_reports,
)
from lgvq_plugins.data.captioned import clean_captions
from lgvq_plugins.data.images import decode_bytes
from lgvq_plugins.data.transforms import PaperTransform, choose_caption
from lgvq_plugins.training import distributed as D

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
LAYOUT = """\
  urls: a brace pattern or list of tar shards, e.g. '/data/shards/train-{000000..000127}.tar'
  each shard: <key>.jpg (or .jpeg/.png/.webp) + <key>.txt (captions, one per line) or <key>.json
              ({"caption": "..."} or {"captions": ["...", ...]})"""


def _header_mode(data: bytes) -> str | None:
    """The PIL mode an encoded image's header declares (None when unreadable: decoding then
    reports the problem)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return str(im.mode)
    except Exception:  # noqa: BLE001 - any failure here is reported by the decoder
        return None


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """Brace patterns (``a-{000..009}.tar``) and ``::``-separated lists → shard list."""
    items = [urls] if isinstance(urls, str) else list(urls)
    out: list[str] = []
    for item in items:
        for part in str(item).split("::"):
            out.extend(braceexpand(part))
    return out


class WebDatasetCaptions(IterableDataset):
    """Image–caption samples from tar shards.

    Args:
        urls: shard pattern(s) for every split, or a dict ``{split: pattern}``.
        split: which entry of ``urls`` when it is a dict; ``train`` draws random crops,
            flips and captions, anything else the center crop and first caption.
        size: output side in pixels.
        skip_bad_samples: skip (and count) samples with a bad image or caption instead of
            raising :class:`~lgvq_plugins.data.bad_samples.BadSampleError`.
        shuffle_shards: reshuffle the shard order every epoch (same order on every rank).
        shuffle_buffer: samples held for a within-worker shuffle (0: stream order).
        rank / world_size: this process's place; ``None`` asks torch.distributed.
        seed: shard shuffling, caption choice.
        min_image_side: smaller images are bad (``tiny_image``).
    """

    NAME = "webdataset"
    LAYOUT = LAYOUT

    def __init__(self, urls: str | Sequence[str] | dict[str, Any], split: str = "train", size: int = 256, *,
                 skip_bad_samples: bool = False, shuffle_shards: bool = True, shuffle_buffer: int = 0,
                 rank: int | None = None, world_size: int | None = None, seed: int = 0,
                 min_image_side: int = 32, flip: bool = True):
        if isinstance(urls, dict):
            if split not in urls:
                raise ValueError(f"webdataset: no shards for split {split!r} (urls has {sorted(urls)})")
            urls = urls[split]
        self.urls = expand_urls(urls)
        missing = [u for u in self.urls if "://" not in u and not u.startswith("pipe:") and not os.path.isfile(u)]
        if not self.urls or missing:
            raise FileNotFoundError(f"webdataset: shard(s) not found: {missing[:3] or urls!r}"
                                    f"{' ...' if len(missing) > 3 else ''}. Expected:\n{LAYOUT}\n"
                                    "Set `webdataset.urls` (see docs/data.md).")
        self.split, self.size, self.seed = split, int(size), int(seed)
        self.skip_bad_samples, self.min_image_side = bool(skip_bad_samples), int(min_image_side)
        self.shuffle_shards, self.shuffle_buffer = bool(shuffle_shards), int(shuffle_buffer)
        self.rank, self.world_size = rank, world_size
        self.train = split == "train"
        self.transform = PaperTransform(self.size, train=self.train, flip=flip)
        # shared memory: bad samples met in DataLoader workers are counted too
        self.problems = SharedProblemTally(self.NAME)
        self.epoch = 0
        self.stream_start: dict[int, tuple[int, int]] = {}

    def set_epoch(self, epoch: int) -> None:
        """Read epoch ``epoch``'s shard order from its start (clears :meth:`set_stream_start`)."""
        self.epoch = int(epoch)
        self.stream_start = {}

    def set_stream_start(self, starts: Mapping[int, Sequence[int]]) -> None:
        """Start this epoch part-way: worker ``w`` (0 without workers) begins at shard slot
        ``starts[w][0]`` of its shard list, skipping the first ``starts[w][1]`` tar groups of
        that shard (read, not decoded); the shards before it are not opened at all. Workers
        not named start at the beginning. Call after :meth:`set_epoch`, before iterating."""
        self.stream_start = {int(w): (int(p[0]), int(p[1])) for w, p in starts.items()}

    def check_stream_split(self, world_size: int, num_workers: int) -> None:
        """Refuse a shard list that leaves a rank with nothing to read (an endless stream
        on that rank would have no sample to give); warn when some workers stay idle."""
        shards, workers = len(self.urls), max(int(num_workers), 1)
        if shards < world_size:
            raise ValueError(
                f"webdataset: {shards} shard(s) cannot feed {world_size} ranks — every rank needs at least "
                f"one shard (shards are split across ranks, not samples). Split the data into at least "
                f"{world_size} shards (ideally a multiple of ranks × workers = {world_size * workers}), or "
                "use fewer ranks.")
        if shards < world_size * workers:
            import warnings

            warnings.warn(f"webdataset: {shards} shard(s) for {world_size} rank(s) × {workers} DataLoader "
                          f"workers: some workers get no shard and stay idle (set Trainer.num_workers ≤ "
                          f"{max(shards // world_size, 1)}, or write more, smaller shards)", stacklevel=2)

    # -- shards ---------------------------------------------------------------------------
    def shards_for(self, rank: int, world_size: int, worker: int, num_workers: int) -> list[str]:
        """The shards one worker of one rank reads this epoch."""
        order = list(self.urls)
        if self.shuffle_shards:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order[rank::world_size][worker::num_workers]

    def _my_shards(self) -> tuple[int, list[str]]:
        """(this worker's id, the shards it reads this epoch)."""
        rank = D.rank() if self.rank is None else int(self.rank)
        world = D.world_size() if self.world_size is None else int(self.world_size)
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return worker, self.shards_for(rank, world, worker, workers)

    # -- samples --------------------------------------------------------------------------
    def _bad(self, err: BadSampleError) -> None:
        if not self.skip_bad_samples:
            raise err
        self.problems.add_error(err)

    def _tar_error(self, exc: Exception) -> bool:
        """webdataset's handler for an unreadable shard member: skip when allowed."""
        if self.skip_bad_samples:
            self.problems.add("corrupt_image", "<shard>", f"{type(exc).__name__}: {exc}")
            return True
        raise exc

    def _captions(self, raw: dict[str, Any], where: str) -> list[str]:
        if "json" in raw:
            try:
                obj = json.loads(raw["json"])
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise BadSampleError(self.NAME, where, "bad_caption_record", f"json: {exc}") from None
            value = obj.get("captions", obj.get("caption")) if isinstance(obj, dict) else None
            return clean_captions([value] if isinstance(value, str) else (value or []))
        if "txt" in raw:
            return clean_captions(raw["txt"].decode("utf-8", errors="replace").splitlines())
        raise BadSampleError(self.NAME, where, "no_caption")

    def decode(self, raw: dict[str, Any]) -> dict[str, Any]:
        """One tar group (``__key__``, ``__url__``, extension → bytes) → a sample dict."""
        where = f"{raw.get('__url__', '?')}:{raw.get('__key__', '?')}"
        key = next((k for k in IMAGE_KEYS if k in raw), None)
        if key is None:
            raise BadSampleError(self.NAME, where, "missing_image", f"no {'/'.join(IMAGE_KEYS)} member")
        captions = self._captions(raw, where)
        if not captions:
            raise BadSampleError(self.NAME, where, "empty_caption")
        mode = _header_mode(raw[key])  # CMYK etc. go to PIL; non-RGB images are counted
        image = decode_bytes(raw[key], where, self.NAME, mode=mode, min_side=self.size)
        if mode not in (None, "RGB"):
            self.problems.add(CONVERTED, where, f"mode {mode}")
        if min(image.shape[1:]) < self.min_image_side:
            raise BadSampleError(self.NAME, where, "tiny_image", f"{image.shape[2]}x{image.shape[1]}")
        uid = zlib.crc32(where.encode("utf-8")) & 0x7FFFFFFF
        caption = choose_caption(captions, self.train, self.seed, uid, self.epoch)
        pixels, _ = self.transform(image, caption)
        return {"image": pixels, "caption": caption, "index": uid, "key": str(raw.get("__key__", ""))}

    def _groups(self, shards: list[str], start: tuple[int, int]) -> Iterator[tuple[int, int, dict[str, Any]]]:
        """(slot, member, raw tar group) from ``start`` on: the shards before the start slot
        are not opened; the groups before the start member are read but not decoded."""
        first_slot, first_member = start
        for slot in range(first_slot, len(shards)):
            groups = wds.tarfile_to_samples(handler=self._tar_error)(iter([{"url": shards[slot]}]))
            for member, raw in enumerate(groups):
                if slot == first_slot and member < first_member:
                    continue
                yield slot, member, raw

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, shards = self._my_shards()
        if not shards:
            return
        groups: Iterator[Any] = self._groups(shards, self.stream_start.get(worker, (0, 0)))
        if self.shuffle_buffer > 0 and self.train:
            groups = wds.shuffle(self.shuffle_buffer, rng=random.Random(self.seed + self.epoch))(groups)
        for slot, member, raw in groups:
            try:
                sample = self.decode(raw)
            except BadSampleError as err:
                self._bad(err)
                continue
            sample["stream_pos"] = torch.tensor([worker, slot, member], dtype=torch.int64)
            yield sample

    def data_report(self) -> dict[str, Any]:
        """Bad samples skipped and images converted, by this process and its DataLoader
        workers, summed over every rank under DDP — a collective then: call it on every rank
        (``Experiment`` does). A bad file is counted each time the stream meets it (once per
        epoch that reads it)."""
        local = {"dataset": self.NAME, "split": self.split, "shards": len(self.urls), **self.problems.report()}
        return merge_reports(D.all_gather_json(local)) if D.is_distributed() else local


__all__ = ["LAYOUT", "WebDatasetCaptions", "expand_urls"]
