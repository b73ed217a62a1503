"""``text_to_image``: caption → codes → image, with a GPT prior conditioned on the caption.

The prior (protocol of :class:`~lgvq_plugins.tasks.unconditional.GenerativeTask`) reads
the caption's per-token features from a frozen registered text encoder (``minilm`` by
default — the same for base and guided tokenizers, so the comparison is of the codes) as
its prefix; features are computed once per caption and cached.

Metrics: ``fid`` (generated vs real images of the evaluated captions) and, on ``shapes``,
whether the generated image shows what the caption says. The ``shapes_segmenter`` reads
which (shape, colour) objects an image shows (at least ``min_object_pixels`` pixels of that
shape class and that colour class; sizes are not read). ``caption_match`` is the fraction
of generated images whose set of objects equals the one the caption describes (val/test
captions mention every object); ``caption_object_f1`` grades partial success, the micro-F1
between the objects read and the objects described, with counts summed over all evaluated
images. ``caption_match_real`` and ``caption_object_f1_real`` are the same on the real
images: the reader's own ceiling, to read the generated numbers against.
"""

from __future__ import annotations

from typing import Any

import torch
from lgvq_plugins.tasks.segmenter import UsesSegmenter, objects_present
from lgvq_plugins.tasks.unconditional import GenerativeTask
from torch import Tensor, nn
from torch.utils.data import Dataset

from lgvq_plugins import api
from lgvq_plugins.second_stage.code_cache import cached_caption_features

#: the caption-faithfulness metrics (and their ceilings on the real images)
MATCH_METRICS = ("caption_match", "caption_match_real", "caption_object_f1", "caption_object_f1_real")


def described_objects(data: Any, index: int) -> Tensor:
    """(shapes, colours) bool: the (shape, colour) objects of ``shapes`` scene ``index``."""
    out = torch.zeros(len(data.SHAPES), len(data.COLOURS), dtype=torch.bool)
    for obj in data.scene(index).objects:
        out[data.SHAPES.index(obj.shape), data.COLOURS.index(obj.colour)] = True
    return out


class TextToImage(UsesSegmenter, GenerativeTask):
    """Text-to-image generation (gin: ``text_to_image.*``).

    Args:
        text_encoder: registered text encoder whose token features condition the prior.
        max_caption_tokens: caption tokens kept (the prefix length).
        segmenter: registered ``metric`` that reads the objects of an image (``"auto"``:
            ``shapes_segmenter`` on ``shapes``, none elsewhere; None: no caption metrics).
        segmenter_config: settings for the segmenter's factory.
        min_object_pixels: pixels of one shape and colour that make an object present.
        other settings: as :class:`~lgvq_plugins.tasks.unconditional.GenerativeTask`.
    """

    conditioning = "text"
    extra_sums = ("match", "match_real", "tp", "pred", "true", "tp_real", "pred_real")

    def __init__(self, *args: Any, text_encoder: str = "minilm", max_caption_tokens: int = 32,
                 segmenter: str | None = "auto", segmenter_config: dict[str, Any] | None = None,
                 min_object_pixels: int = 4, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.text_encoder_name, self.max_caption_tokens = text_encoder, int(max_caption_tokens)
        self._init_segmenter(segmenter, segmenter_config)
        self.min_object_pixels = int(min_object_pixels)
        self._encoder: nn.Module | None = None

    def _text(self) -> nn.Module:
        if self._encoder is None:
            self._encoder = api.create_text_encoder(self.text_encoder_name)
        return self._encoder

    def cond_dim(self) -> int:
        return int(self._text().width)

    def prefix(self, data: Dataset, indices: list[int], codes: Tensor) -> tuple[Tensor, Tensor]:
        captions = [data[i]["caption"] for i in indices]
        feats, mask = cached_caption_features(self._text(), captions, cache_dir=self.cache_dir)
        return feats[:, : self.max_caption_tokens], mask[:, : self.max_caption_tokens]

    def _read(self, images: Tensor, num_shapes: int, num_colours: int) -> Tensor:
        self._segmenter = self._segmenter.to(images.device)
        shape_map, colour_map = self._segmenter.read(images)
        return objects_present(shape_map, colour_map, num_shapes, num_colours, self.min_object_pixels).flatten(1)

    def extra_metrics(self, data: Dataset, indices: list[int], images: Tensor, extractor: nn.Module | None,
                      sums: dict[str, float]) -> None:
        if self._segmenter is None:
            return
        n_shapes, n_colours = len(data.SHAPES), len(data.COLOURS)
        truth = torch.stack([described_objects(data, i) for i in indices]).flatten(1).to(images.device)
        real = torch.stack([data[i]["image"] for i in indices]).to(images.device)
        sums["true"] += float(truth.sum())
        for suffix, batch in (("", images), ("_real", real)):
            read = self._read(batch, n_shapes, n_colours)
            sums["match" + suffix] += float((read == truth).all(1).sum())
            sums["tp" + suffix] += float((read & truth).sum())
            sums["pred" + suffix] += float(read.sum())

    def finish_metrics(self, data: Dataset, sums: dict[str, float], n: int, metrics: dict[str, float | None],
                       unavailable: dict[str, str], extractor: nn.Module | None) -> None:
        if self._segmenter is None:
            for key in MATCH_METRICS:
                metrics[key], unavailable[key] = None, f"no object reader: {self._segmenter_why}"
            return
        metrics["caption_match"] = sums["match"] / max(n, 1)
        metrics["caption_match_real"] = sums["match_real"] / max(n, 1)
        for suffix in ("", "_real"):
            metrics["caption_object_f1" + suffix] = object_f1(sums["tp" + suffix], sums["pred" + suffix], sums["true"])

    def extra_protocol(self) -> dict[str, Any]:
        if self._segmenter is None:
            return {}
        return {"caption_match": {**getattr(self._segmenter, "protocol", {}), "objects": "(shape, colour) pairs",
                                  "min_object_pixels": self.min_object_pixels,
                                  "object_f1": "micro-F1, counts summed over all evaluated images"}}


def object_f1(true_positives: float, predicted: float, true: float) -> float:
    """Micro-F1 from summed counts: 2·TP / (predicted + true); 1.0 when both are empty."""
    return 1.0 if predicted + true == 0 else 2.0 * true_positives / (predicted + true)


__all__ = ["MATCH_METRICS", "TextToImage", "described_objects", "object_f1"]
