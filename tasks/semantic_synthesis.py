"""``semantic_synthesis``: semantic map → codes → image, with a GPT prior conditioned on the map.

Protocol of :class:`~lgvq_plugins.tasks.unconditional.GenerativeTask`. The prefix is the
map at the code grid's resolution: for each of the ``h·w`` code cells, the fraction of its
pixels in each class (average-pooled one-hot of the sample's ``semantic`` map), so the
prior knows which shape lies where. Metrics: ``fid``, ``nll``; ``miou`` (segmentation of
the generated image against the map) is reported unavailable: the ``shapes`` probe
classifies objects, it does not segment.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lgvq_plugins.tasks.unconditional import GenerativeTask
from torch import Tensor, nn
from torch.utils.data import Dataset


class SemanticSynthesis(GenerativeTask):
    """Semantic image synthesis (gin: ``semantic_synthesis.*``).

    Args:
        num_classes: classes of the ``semantic`` maps (``shapes``: background + 5 shapes).
        other settings: as :class:`~lgvq_plugins.tasks.unconditional.GenerativeTask`.
    """

    conditioning = "semantic_map"

    def __init__(self, *args: Any, num_classes: int = 6, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.num_classes = int(num_classes)

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

    def finish_metrics(self, data: Dataset, sums: dict[str, float], n: int, metrics: dict[str, float | None],
                       unavailable: dict[str, str], extractor: nn.Module | None) -> None:
        metrics["miou"] = None
        unavailable["miou"] = ("needs a segmenter of generated images; the shapes probe classifies objects, "
                               "it does not segment")


__all__ = ["SemanticSynthesis"]
