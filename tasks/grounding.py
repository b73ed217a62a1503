"""``grounding``: codes + referring expression → box; Acc@0.5 IoU and mean IoU.

Protocol of :class:`~lgvq_plugins.tasks.vqa.ReaderTask`: a
:class:`~lgvq_plugins.second_stage.heads.CodeReader` reads the codes and the sample's
``refexp`` and regresses the referred object's box ``(x0, y0, x1, y1)`` (pixels, as the
data set gives it) in image-size units, trained with L1 + generalised IoU loss (DETR's
pair). A prediction counts at Acc@0.5 when its IoU with the true box is at least 0.5.
Under torchrun the predicted and true boxes of every rank are gathered in sample order, so
1 and N processes give the same numbers.
"""

from __future__ import annotations

from typing import Any

import torch
from lgvq_plugins.tasks.vqa import ReaderTask
from torch import Tensor
from torchvision.ops import box_iou, generalized_box_iou_loss


def pair_iou(pred: Tensor, target: Tensor) -> Tensor:
    """IoU of each predicted box with its own target (N,), boxes (N, 4) ``(x0, y0, x1, y1)``."""
    if pred.shape[0] == 0:
        return pred.new_zeros(0)
    return box_iou(pred.float(), target.float()).diagonal()


def accuracy_at(iou: Tensor, threshold: float = 0.5) -> float:
    """Fraction of IoUs at or above ``threshold`` (RefCOCO's Acc@0.5)."""
    return float((iou >= threshold).float().mean()) if iou.numel() else float("nan")


def _to_box(out: Tensor) -> Tensor:
    """Head outputs (N, 4) → valid boxes in [0, 1]: sigmoid (cx, cy, w, h) → (x0, y0, x1, y1)."""
    cx, cy, w, h = out.sigmoid().unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1).clamp(0, 1)


class Grounding(ReaderTask):
    """Visual grounding of referring expressions (gin: ``grounding.*``)."""

    text_key = "refexp"

    def out_dim(self, train, samples: list[dict[str, Any]]) -> int:
        return 4

    @staticmethod
    def _norm(samples: list[dict[str, Any]]) -> Tensor:
        boxes = torch.stack([torch.as_tensor(s["box"]).float() for s in samples])
        size = torch.tensor([[s["image"].shape[-1], s["image"].shape[-2]] * 2 for s in samples]).float()
        return boxes / size

    def targets(self, samples: list[dict[str, Any]]) -> Tensor:
        return self._norm(samples)

    def loss(self, out: Tensor, target: Tensor) -> Tensor:
        box = _to_box(out)
        return (box - target).abs().sum(-1).mean() + generalized_box_iou_loss(box, target, reduction="mean")

    def record(self, index: int, sample: dict[str, Any]) -> dict[str, Any]:
        return {"index": int(index), "refexp": sample["refexp"], "box": self._norm([sample])[0].tolist()}

    def score(self, out: Tensor, records: list[dict[str, Any]]):
        if not records:
            why = "no evaluated samples"
            return {"acc_0.5": None, "mean_iou": None}, {"acc_0.5": why, "mean_iou": why}, {}
        boxes = _to_box(out)
        iou = pair_iou(boxes, torch.tensor([r["box"] for r in records]))
        examples = [{"index": r["index"], "refexp": r["refexp"], "box": r["box"], "predicted": b.tolist(),
                     "iou": float(i)} for r, b, i in list(zip(records, boxes, iou))[:32]]
        return {"acc_0.5": accuracy_at(iou, 0.5), "mean_iou": float(iou.mean())}, {}, {"examples": examples}


__all__ = ["Grounding", "accuracy_at", "pair_iou"]
