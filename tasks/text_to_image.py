"""``text_to_image``: caption → codes → image, with a GPT prior conditioned on the caption.

The prior (protocol of :class:`~lgvq_plugins.tasks.unconditional.GenerativeTask`) reads
the caption's per-token features from a frozen registered text encoder (``minilm`` by
default — the same for base and guided tokenizers, so the comparison is of the codes) as
its prefix; features are computed once per caption and cached.

Metrics: ``fid`` (generated vs real images of the evaluated captions) and, on ``shapes``
with the ``shapes_probe`` extractor, ``caption_match``: the fraction of generated images
whose set of objects (shape, colour, size), as the probe reads it, equals the scene the
caption describes (val/test captions mention every object). ``caption_match_real`` is the
same rate on the real images: the probe's own ceiling, to read ``caption_match`` against.
Exact matches are rare for a small probe, so ``caption_object_f1`` grades partial matches:
the micro-F1 between the objects the probe reads in the generated images and the objects
the captions describe, summed over all evaluated images (``caption_object_f1_real``: the
same on the real images).
"""

from __future__ import annotations

from typing import Any

import torch
from lgvq_plugins.tasks.features import shapes_labels
from lgvq_plugins.tasks.unconditional import GenerativeTask, looks_like_shapes
from torch import Tensor, nn
from torch.utils.data import Dataset

from lgvq_plugins import api
from lgvq_plugins.second_stage.code_cache import cached_caption_features


class TextToImage(GenerativeTask):
    """Text-to-image generation (gin: ``text_to_image.*``).

    Args:
        text_encoder: registered text encoder whose token features condition the prior.
        max_caption_tokens: caption tokens kept (the prefix length).
        other settings: as :class:`~lgvq_plugins.tasks.unconditional.GenerativeTask`.
    """

    conditioning = "text"
    extra_sums = ("match", "match_real", "tp", "pred", "true", "tp_real", "pred_real")

    def __init__(self, *args: Any, text_encoder: str = "minilm", max_caption_tokens: int = 32, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.text_encoder_name, self.max_caption_tokens = text_encoder, int(max_caption_tokens)
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

    @staticmethod
    def _objects(extractor: nn.Module, images: Tensor, n_combo: int) -> Tensor:
        feats = extractor(images)
        return extractor.net.head(feats)[:, :n_combo] > 0  # (B, 80) predicted objects

    def extra_metrics(self, data: Dataset, indices: list[int], images: Tensor, extractor: nn.Module | None,
                      sums: dict[str, float]) -> None:
        if not self._can_match(data, extractor):
            return
        n_combo = len(data.SHAPES) * len(data.COLOURS) * len(data.SIZES)
        truth = torch.stack([shapes_labels(data, i)[:n_combo] for i in indices]).bool().to(images.device)
        real = torch.stack([data[i]["image"] for i in indices]).to(images.device)
        sums["true"] += float(truth.sum())
        for suffix, batch in (("", images), ("_real", real)):
            read = self._objects(extractor, batch, n_combo)
            sums["match" + suffix] += float((read == truth).all(1).sum())
            sums["tp" + suffix] += float((read & truth).sum())
            sums["pred" + suffix] += float(read.sum())

    @staticmethod
    def _can_match(data: Dataset, extractor: nn.Module | None) -> bool:
        return extractor is not None and looks_like_shapes(data) and hasattr(getattr(extractor, "net", None), "head")

    def finish_metrics(self, data: Dataset, sums: dict[str, float], n: int, metrics: dict[str, float | None],
                       unavailable: dict[str, str], extractor: nn.Module | None) -> None:
        if self._can_match(data, extractor):
            metrics["caption_match"] = sums["match"] / max(n, 1)
            metrics["caption_match_real"] = sums["match_real"] / max(n, 1)
            for suffix in ("", "_real"):
                metrics["caption_object_f1" + suffix] = object_f1(sums["tp" + suffix], sums["pred" + suffix],
                                                                  sums["true"])
        else:
            why = "needs `shapes` data and the `shapes_probe` extractor (it reads the objects of an image)"
            for key in ("caption_match", "caption_match_real", "caption_object_f1", "caption_object_f1_real"):
                metrics[key], unavailable[key] = None, why


def object_f1(true_positives: float, predicted: float, true: float) -> float:
    """Micro-F1 from summed counts: 2·TP / (predicted + true); 1.0 when both are empty."""
    return 1.0 if predicted + true == 0 else 2.0 * true_positives / (predicted + true)


__all__ = ["TextToImage", "object_f1"]
