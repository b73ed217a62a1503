"""The paper's image transforms and caption choice.

Training: resize the shorter side to the run's size, take a random ``size``×``size`` crop
and flip horizontally with probability 1/2 — except when the caption names a side ("left",
"right"), which a mirror image would contradict. Evaluation: the same resize, a center crop
and the image's first caption, so validation numbers do not depend on chance.
Images come in as uint8 (3, H, W) and leave as float32 (3, size, size) in [-1, 1].
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

_SIDE_WORDS = re.compile(r"\b(left|right|lefthand|righthand|leftmost|rightmost)\b", re.IGNORECASE)
_MASK64 = (1 << 64) - 1


def names_a_side(caption: str | None) -> bool:
    """True when flipping the image would make ``caption`` wrong ("on the left", "right wing")."""
    return bool(caption) and _SIDE_WORDS.search(caption) is not None


def to_signed_float(image: Tensor) -> Tensor:
    """uint8 [0, 255] → float32 [-1, 1]."""
    return image.to(torch.float32).div_(127.5).sub_(1.0)


def mix(*values: int) -> int:
    """A 64-bit hash of small integers (splitmix64 steps), for reproducible choices."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & _MASK64
        h ^= h >> 31
    return h


def choose_caption(captions: Sequence[str], train: bool, seed: int, index: int, epoch: int) -> str:
    """Evaluation: the first caption. Training: one chosen by a hash of (seed, index, epoch),
    so every caption is seen over the epochs and a resumed run makes the same choices."""
    if not train or len(captions) == 1:
        return captions[0]
    return captions[mix(seed, index, epoch) % len(captions)]


@dataclass(frozen=True)
class Geometry:
    """How an image was resized, cropped and flipped, to move boxes and masks alike."""

    scale_x: float
    scale_y: float
    top: int
    left: int
    flipped: bool
    size: int
    height: int  # after the resize, before the crop
    width: int

    def box(self, box: Sequence[float]) -> Tensor:
        """``(x0, y0, x1, y1)`` in original pixels → the same in output pixels, clipped to the
        crop (float32 (4,); an object cropped away has zero width or height)."""
        x0, y0, x1, y1 = (float(v) for v in box)
        x0, x1 = x0 * self.scale_x - self.left, x1 * self.scale_x - self.left
        y0, y1 = y0 * self.scale_y - self.top, y1 * self.scale_y - self.top
        if self.flipped:
            x0, x1 = self.size - x1, self.size - x0
        out = torch.tensor([x0, y0, x1, y1], dtype=torch.float32)
        return out.clamp_(0.0, float(self.size))

    def mask(self, mask: Tensor) -> Tensor:
        """A label map (H, W) of the image (any resolution of the same aspect) → (size, size),
        nearest neighbour."""
        small = mask.to(torch.uint8) if (int(mask.max()) if mask.numel() else 0) < 256 else mask.float()
        out = TF.resize(small[None], [self.height, self.width],
                        interpolation=TF.InterpolationMode.NEAREST_EXACT)[0].to(mask.dtype)
        out = out[self.top:self.top + self.size, self.left:self.left + self.size]
        return out.flip(-1) if self.flipped else out


class PaperTransform:
    """Resize + random crop + guarded flip (train) or resize + center crop (eval).

    Args:
        size: output side in pixels.
        train: training (random crop, flip) or evaluation (center crop) behaviour.
        flip: allow horizontal flips in training (never when the caption names a side).
        generator: random source; ``None`` uses torch's global generator (seeded per
            DataLoader worker by torch).
    """

    def __init__(self, size: int, train: bool, flip: bool = True, generator: torch.Generator | None = None):
        if int(size) < 1:
            raise ValueError(f"PaperTransform: size={size} must be >= 1")
        self.size, self.train, self.flip, self.generator = int(size), bool(train), bool(flip), generator

    def crop_box(self, height: int, width: int) -> tuple[int, int]:
        """Top-left corner of the crop in an image already resized to shorter side ``size``."""
        if not self.train:
            return (height - self.size) // 2, (width - self.size) // 2
        top = int(torch.randint(0, height - self.size + 1, (1,), generator=self.generator))
        left = int(torch.randint(0, width - self.size + 1, (1,), generator=self.generator))
        return top, left

    def __call__(self, image: Tensor, caption: str | None = None) -> tuple[Tensor, bool]:
        """``image`` uint8 (3, H, W) → (float32 (3, size, size) in [-1, 1], flipped?)."""
        out, geometry = self.apply(image, caption)
        return out, geometry.flipped

    def apply(self, image: Tensor, caption: str | None = None) -> tuple[Tensor, Geometry]:
        """As ``__call__``, returning the :class:`Geometry` used (for boxes and masks)."""
        if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"PaperTransform: expected a uint8 (3, H, W) image, got {image.dtype} "
                             f"{tuple(image.shape)}")
        h0, w0 = int(image.shape[1]), int(image.shape[2])
        h, w = h0, w0
        if min(h, w) != self.size:  # shorter side to size, aspect kept (antialiased like PIL)
            scale = self.size / min(h, w)
            h, w = max(self.size, round(h * scale)), max(self.size, round(w * scale))
            # channels-last takes torch's vectorised uint8 path: 2x faster, identical pixels
            batch = image.unsqueeze(0).contiguous(memory_format=torch.channels_last)
            image = TF.resize(batch, [h, w], antialias=True)[0]
        top, left = self.crop_box(h, w)
        image = image[:, top:top + self.size, left:left + self.size]
        flipped = False
        if self.train and self.flip and not names_a_side(caption):
            flipped = bool(torch.rand((), generator=self.generator) < 0.5)
            if flipped:
                image = image.flip(-1)
        geometry = Geometry(w / w0, h / h0, top, left, flipped, self.size, h, w)
        return to_signed_float(image.contiguous()), geometry

    def __repr__(self) -> str:
        return f"PaperTransform(size={self.size}, train={self.train}, flip={self.flip})"


__all__ = ["Geometry", "PaperTransform", "choose_caption", "mix", "names_a_side", "to_signed_float"]
