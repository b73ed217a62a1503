"""``lgvq cache-text``: encode every caption of a data set once, ahead of training, into the
on-disk text-feature cache (:class:`~lgvq_plugins.text.cache.TextFeatureCache`).

Training then never waits for the text encoder: ``LanguageGuided`` finds every caption in
``LanguageGuided.cache_dir``. The cache's shards are written atomically and keyed by the
encoder's identity and caption length, so every DDP rank (and every later run with the same
encoder) reads the same folder; features of another encoder are never used.

    lgvq cache-text --gin gin/paper/cub200_cvq_lg.gin \\
        --gin_bindings "cub200.root = '/data/cub'" --gin_bindings "LanguageGuided.cache_dir = '/data/cub/text_cache'"
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import gin
from lgvq_plugins import api


def _bound(name: str, default: Any) -> Any:
    try:
        return gin.query_parameter(name)
    except ValueError:  # not bound in the parsed files: the constructor's default applies
        return default


def dataset_captions(data: Any) -> list[str]:
    """Every caption of a data set, each once, in first-seen order: ``all_captions()`` when
    the data set has it, else ``captions(i)`` per index, else each sample's ``caption``."""
    if hasattr(data, "all_captions"):
        return list(data.all_captions())
    if hasattr(data, "captions"):
        found: Iterable[str] = (c for i in range(len(data)) for c in data.captions(i))
    else:
        found = (data[i]["caption"] for i in range(len(data)))
    return list(dict.fromkeys(c for c in found if isinstance(c, str) and c.strip()))


def cache_text(splits: Sequence[str] = ("train", "val"), batch_size: int = 256, cache_dir: str | None = None,
               progress: bool = True) -> dict[str, Any]:
    """Encode the captions of ``splits`` of the parsed gin configuration's data set
    (``Experiment.dataset``) with its text encoder (``LanguageGuided.text_encoder``) into
    ``cache_dir`` (default ``LanguageGuided.cache_dir``). Returns counts per split.

    Raises:
        ValueError: no cache folder is set (features kept only in memory would be lost).
    """
    from lgvq_plugins.text.cache import TextFeatureCache

    folder = cache_dir or _bound("LanguageGuided.cache_dir", None)
    if not folder:
        raise ValueError("lgvq cache-text: no cache folder — bind `LanguageGuided.cache_dir = '...'` "
                         "(the folder training reads) or pass --cache-dir")
    dataset = _bound("Experiment.dataset", "shapes")
    encoder_name = _bound("LanguageGuided.text_encoder", "minilm")
    encoder = api.create_text_encoder(encoder_name)
    if hasattr(encoder, "eval"):
        encoder.eval()
    cache = TextFeatureCache(encoder, cache_dir=folder)
    report: dict[str, Any] = {"dataset": dataset, "text_encoder": encoder_name, "cache_dir": str(cache.directory)}
    for split in splits:
        captions = dataset_captions(api.create_dataset(dataset, split=split))
        encoded = cache.warm(captions, batch_size=batch_size, progress=progress)
        report[split] = {"captions": len(captions), "encoded": encoded, "already_cached": len(captions) - encoded}
    return report


__all__ = ["cache_text", "dataset_captions"]
