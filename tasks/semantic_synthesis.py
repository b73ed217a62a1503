"""``semantic_synthesis``: semantic map → codes → image, with a GPT prior conditioned on the map.

Protocol of :class:`~lgvq_plugins.tasks.unconditional.GenerativeTask`. The prefix is the
map at the code grid's resolution: for each of the ``h·w`` code cells, the fraction of its
pixels in each class (average-pooled one-hot of the sample's ``semantic`` map), so the
prior knows which shape lies where. Metrics: ``fid``, ``nll`` and, on ``shapes``, ``miou``:
the ``shapes_segmenter``'s segmentation of each generated image against the map it was
generated from (intersections and unions per class summed over the evaluated images and
processes, mean over the classes that occur). ``miou_real`` is the same measure on the real
images, the segmenter's own ceiling to read ``miou`` against.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lgvq_plugins.tasks.segmenter import UsesSegmenter, confusion, iou_per_class
from lgvq_plugins.tasks.unconditional import GenerativeTask
from torch import Tensor, nn
from torch.utils.data import Dataset


class SemanticSynthesis(UsesSegmenter, GenerativeTask):
    """Semantic image synthesis (gin: ``semantic_synthesis.*``).

    Args:
        num_classes: classes of the ``semantic`` maps (``shapes``: background + 5 shapes).
        segmenter: registered ``metric`` that segments generated images for ``miou``
            (``"auto"``: ``shapes_segmenter`` on ``shapes``, none elsewhere; None: no mIoU).
        segmenter_config: settings for the segmenter's factory.
        other settings: as :class:`~lgvq_plugins.tasks.unconditional.GenerativeTask`.
    """

    conditioning = "semantic_map"

    def __init__(self, *args: Any, num_classes: int = 6, segmenter: str | None = "auto",
                 segmenter_config: dict[str, Any] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.num_classes = int(num_classes)
        self._init_segmenter(segmenter, segmenter_config)
        self._iou_per_class: dict[str, list[float | None]] = {}
        # confusion-matrix cells of generated and real images, summed like the other sums
        cells = range(self.num_classes * self.num_classes)
        self.extra_sums = (*(f"conf_fake_{k}" for k in cells), *(f"conf_real_{k}" for k in cells))

    def cond_dim(self) -> int:
        return self.num_classes

    def prefix(self, data: Dataset, indices: list[int], codes: Tensor) -> tuple[Tensor, Tensor]:
        maps = torch.stack([torch.as_tensor(data[i]["semantic"]) for i in indices])  # (B, H, W)
        if int(maps.max()) >= self.num_classes or int(maps.min()) < 0:
            raise ValueError(f"semantic map classes span {int(maps.min())}..{int(maps.max())}; set "
                             f"semantic_synthesis.num_classes above the largest")
        h, w = self.grid or (maps.shape[-2], maps.shape[-1])
        if h * w != codes.shape[1]:
            raise ValueError(f"{codes.shape[1]} codes per image do not fill the {h}x{w} code grid")
        onehot = F.one_hot(maps, self.num_classes).permute(0, 3, 1, 2).float()  # (B, C, H, W)
        cells = F.adaptive_avg_pool2d(onehot, (h, w))  # class fractions per code cell
        return cells.flatten(2).transpose(1, 2), torch.ones(len(indices), h * w, dtype=torch.bool)

    def extra_metrics(self, data: Dataset, indices: list[int], images: Tensor, extractor: nn.Module | None,
                      sums: dict[str, float]) -> None:
        if self._segmenter is None:
            return
        segmenter = self._segmenter.to(images.device)
        maps = torch.stack([torch.as_tensor(data[i]["semantic"]) for i in indices]).to(images.device)
        real = torch.stack([data[i]["image"] for i in indices]).to(images.device)
        for kind, batch in (("fake", images), ("real", real)):
            pred = segmenter(batch)
            if pred.shape[-2:] != maps.shape[-2:]:
                pred = F.interpolate(pred, size=maps.shape[-2:], mode="bilinear", align_corners=False)
            conf = confusion(pred.argmax(1), maps, self.num_classes).flatten().tolist()
            for k, count in enumerate(conf):
                sums[f"conf_{kind}_{k}"] += count

    def finish_metrics(self, data: Dataset, sums: dict[str, float], n: int, metrics: dict[str, float | None],
                       unavailable: dict[str, str], extractor: nn.Module | None) -> None:
        if self._segmenter is None:
            metrics["miou"] = metrics["miou_real"] = None
            unavailable["miou"] = unavailable["miou_real"] = self._segmenter_why or "no segmenter"
            return
        c = self.num_classes
        for kind, key in (("fake", "miou"), ("real", "miou_real")):
            conf = torch.tensor([sums[f"conf_{kind}_{k}"] for k in range(c * c)], dtype=torch.float64).reshape(c, c)
            per_class = iou_per_class(conf)
            metrics[key] = float(per_class.nanmean()) if n > 0 else None
            self._iou_per_class[key] = [None if v != v else round(float(v), 4) for v in per_class]

    def extra_protocol(self) -> dict[str, Any]:
        if self._segmenter is None:
            return {}
        return {"miou": {**getattr(self._segmenter, "protocol", {}), "iou_per_class": dict(self._iou_per_class),
                         "classes": "0 background, then the data set's shapes in order",
                         "reduction": "per class: summed intersections / summed unions over all images; "
                                      "mean over classes with a non-zero union"}}


__all__ = ["SemanticSynthesis"]
