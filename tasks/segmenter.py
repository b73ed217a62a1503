"""``shapes_segmenter``: a small network that segments ``shapes`` scenes — which shape and
which colour each pixel belongs to — so semantic synthesis can be scored by mIoU of the
generated image's segmentation against the map it was generated from, and text-to-image by
whether the (shape, colour) objects a caption names are in the generated image.

Like the ``shapes_probe`` it is trained deterministically (fixed seed, fixed data) once per
settings and cached under ``<cache_dir>/shapes_segmenter/<hash>.pt``, with its held-out mIoU
in the JSON beside it. mIoU is the data-set-level measure: intersections and unions of each
class summed over all evaluated images (and processes), IoU per class, mean over the
classes that occur (non-zero union).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.functional.classification import multiclass_confusion_matrix

from lgvq_plugins.tasks.features import cache_dir
from lgvq_plugins.tasks.trained_net import load_or_train, reset_parameters, settings_digest


def confusion(pred: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """(C, C) pixel counts, rows the true class, columns the predicted one (torchmetrics)."""
    return multiclass_confusion_matrix(pred.reshape(-1), target.reshape(-1), num_classes,
                                       validate_args=False).long()


def iou_per_class(conf: Tensor) -> Tensor:
    """IoU of each class from a summed confusion matrix; NaN where the class has no pixel in
    either the truth or the prediction (union 0)."""
    conf = conf.double()
    inter = conf.diagonal()
    union = conf.sum(0) + conf.sum(1) - inter
    return torch.where(union > 0, inter / union.clamp_min(1), torch.full_like(inter, float("nan")))


def mean_iou(conf: Tensor) -> float:
    """Mean IoU over the classes that occur (see :func:`iou_per_class`)."""
    return float(iou_per_class(conf).nanmean())


def _block(i: int, o: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(i, o, 3, stride, 1), nn.GroupNorm(8, o), nn.GELU(),
                         nn.Conv2d(o, o, 3, 1, 1), nn.GroupNorm(8, o), nn.GELU())


class _SegNet(nn.Module):
    """A three-level U-Net: full, 1/2 and 1/4 resolution, skips by concatenation."""

    def __init__(self, width: int, num_classes: int):
        super().__init__()
        w = width
        self.enc1, self.enc2, self.enc3 = _block(3, w), _block(w, 2 * w, 2), _block(2 * w, 4 * w, 2)
        self.dec2, self.dec1 = _block(6 * w, 2 * w), _block(3 * w, w)
        self.head = nn.Conv2d(w, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        e3 = self.enc3(e2)
        d2 = self.dec2(torch.cat([F.interpolate(e3, size=e2.shape[-2:], mode="nearest"), e2], 1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, size=e1.shape[-2:], mode="nearest"), e1], 1))
        return self.head(d1)


class ShapesSegmenter(nn.Module):
    """Segments ``shapes`` images: shape class per pixel (0 background, 1–5 the shapes, as the
    data set's ``semantic`` map) and colour class per pixel (0 background, 1–8 the colours,
    as its ``colour_map``).

    Args:
        image_size: side the network sees (inputs of another size are resized bilinearly,
            and its logits resized back).
        num_train: training scenes (``shapes`` train split).
        steps, batch_size, lr: Adam training budget (pixel-wise cross-entropy of both maps).
        width: channels at full resolution (×2, ×4 below).
        max_objects: objects per training scene (the data set's default).
        data_seed: seed of the ``shapes`` data it trains on.
        seed: seed of initialisation and batch order.
        cache_dir: cache folder; default ``$LGVQ_CACHE_DIR`` or ``~/.cache/lgvq_plugins``.
    """

    def __init__(self, image_size: int = 32, num_train: int = 4000, steps: int = 1200, batch_size: int = 32,
                 lr: float = 2e-3, width: int = 16, max_objects: int = 3, data_seed: int = 0, seed: int = 0,
                 cache_dir: str | None = None):
        super().__init__()
        from lgvq_plugins.data.shapes import ShapesDataset  # the data it segments

        self._data_cls = ShapesDataset
        self.num_classes = 1 + len(ShapesDataset.SHAPES)
        self.num_colour_classes = 1 + len(ShapesDataset.COLOURS)
        self.settings = {"version": 2, "image_size": int(image_size), "num_train": int(num_train),
                         "steps": int(steps), "batch_size": int(batch_size), "lr": float(lr), "width": int(width),
                         "max_objects": int(max_objects), "data_seed": int(data_seed), "seed": int(seed)}
        self.image_size = int(image_size)
        self.net = _SegNet(int(width), self.num_classes + self.num_colour_classes)
        digest = settings_digest(self.settings)
        self.path = segmenter_cache_dir(cache_dir) / f"{digest}.pt"
        self.info = load_or_train(self.net, self.path, self.settings, self._fit)
        self.net.eval().requires_grad_(False)
        self.protocol = {"segmenter": "shapes_segmenter", "classes": self.num_classes,
                         "colour_classes": self.num_colour_classes,
                         "resize": f"bilinear to {self.image_size}x{self.image_size}",
                         "settings": {**self.settings, "hash": digest,
                                      "heldout_miou": self.info.get("heldout_miou"),
                                      "heldout_colour_miou": self.info.get("heldout_colour_miou")}}

    def train(self, mode: bool = True) -> ShapesSegmenter:
        return super().train(False)

    def _dataset(self, split: str, n: int) -> tuple[Tensor, Tensor, Tensor]:
        s = self.settings
        data = self._data_cls(split, size=s["image_size"], num_samples=n, seed=s["data_seed"],
                              max_objects=s["max_objects"])
        samples = [data[i] for i in range(n)]
        return (torch.stack([x["image"] for x in samples]),
                torch.stack([torch.as_tensor(x["semantic"]) for x in samples]).long(),
                torch.stack([torch.as_tensor(x["colour_map"]) for x in samples]).long())

    def _loss(self, logits: Tensor, shapes: Tensor, colours: Tensor) -> Tensor:
        c = self.num_classes
        return F.cross_entropy(logits[:, :c], shapes) + F.cross_entropy(logits[:, c:], colours)

    def _fit(self) -> dict[str, Any]:
        s = self.settings
        images, maps, colours = self._dataset("train", s["num_train"])
        with torch.random.fork_rng(devices=[]), torch.enable_grad():  # tasks run under no_grad
            reset_parameters(self.net, s["seed"])
            opt = torch.optim.Adam(self.net.parameters(), lr=s["lr"])
            g = torch.Generator().manual_seed(s["seed"])
            self.net.train()
            for _ in range(s["steps"]):
                idx = torch.randint(0, images.shape[0], (s["batch_size"],), generator=g)
                loss = self._loss(self.net(images[idx]), maps[idx], colours[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            self.net.eval()
        held_images, held_maps, held_colours = self._dataset("val", 200)
        with torch.no_grad():
            logits = self.net(held_images)
        c = self.num_classes
        conf = confusion(logits[:, :c].argmax(1), held_maps, c)
        conf_colour = confusion(logits[:, c:].argmax(1), held_colours, self.num_colour_classes)
        return {"final_train_loss": float(loss.detach()), "heldout_miou": mean_iou(conf),
                "heldout_iou_per_class": [round(float(v), 4) for v in iou_per_class(conf)],
                "heldout_colour_miou": mean_iou(conf_colour),
                "heldout": "200 shapes val scenes; IoU per class summed over the images, mean over classes"}

    @torch.no_grad()
    def all_logits(self, images: Tensor) -> Tensor:
        """Shape then colour class logits (B, classes + colour classes, H, W) at the input's
        resolution."""
        x = images.float().clamp(-1, 1)
        size = x.shape[-2:]
        if size != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        logits = self.net(x)
        if logits.shape[-2:] != size:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits

    def forward(self, images: Tensor) -> Tensor:
        """Shape class logits (B, C, H, W) at the input's resolution."""
        return self.all_logits(images)[:, : self.num_classes]

    def segment(self, images: Tensor) -> Tensor:
        """Shape class per pixel (B, H, W)."""
        return self(images).argmax(1)

    def read(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(shape class, colour class) per pixel, each (B, H, W)."""
        logits = self.all_logits(images)
        return logits[:, : self.num_classes].argmax(1), logits[:, self.num_classes:].argmax(1)


def objects_present(shape_map: Tensor, colour_map: Tensor, num_shapes: int, num_colours: int,
                    min_pixels: int) -> Tensor:
    """(B, num_shapes, num_colours) bool: which (shape, colour) objects an image shows, as at
    least ``min_pixels`` pixels of that shape class *and* that colour class. Maps hold 0 for
    background and 1 + index otherwise."""
    joint = (shape_map * (num_colours + 1) + colour_map).flatten(1)  # (B, H·W) joint class
    counts = torch.zeros(joint.shape[0], (num_shapes + 1) * (num_colours + 1), dtype=torch.long,
                         device=joint.device).scatter_add_(1, joint, torch.ones_like(joint))
    counts = counts.reshape(-1, num_shapes + 1, num_colours + 1)[:, 1:, 1:]
    return counts >= min_pixels


def segmenter_cache_dir(override: str | None) -> Path:
    return cache_dir(override) / "shapes_segmenter"





def create_segmenter(name: str | None, config: dict[str, Any], data: Any) -> tuple[nn.Module | None, str | None]:
    """The registered segmenter ``name`` (``"auto"``: ``shapes_segmenter`` on ``shapes``, none
    elsewhere), or ``(None, why)``."""
    from lgvq_plugins import api
    from lgvq_plugins.tasks.features import looks_like_shapes

    if name == "auto":
        if not looks_like_shapes(data):
            return None, "no segmenter for this data set ('auto' has one for `shapes` only)"
        name = "shapes_segmenter"
    if name is None:
        return None, "segmenter = None"
    return api.create_metric(name, **config), None
class UsesSegmenter:
    """Mixin of the generation tasks whose metrics read generated images with a segmenter
    (``segmenter`` / ``segmenter_config`` settings): built once, on every rank, in
    :meth:`prepare` (before any batch: a segmenter trained on first use waits at a barrier);
    ``None`` with the reason in ``_segmenter_why`` when there is none for the data."""

    def _init_segmenter(self, name: str | None, config: dict[str, Any] | None) -> None:
        self.segmenter_name, self.segmenter_config = name, dict(config or {})
        self._segmenter: nn.Module | None = None
        self._segmenter_why: str | None = None

    def prepare(self, data: Any) -> None:
        if self._segmenter is None and self._segmenter_why is None:
            self._segmenter, self._segmenter_why = create_segmenter(self.segmenter_name, self.segmenter_config, data)


__all__ = ["ShapesSegmenter", "UsesSegmenter", "confusion", "create_segmenter", "iou_per_class", "mean_iou", "objects_present"]
