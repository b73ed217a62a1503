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
        if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"PaperTransform: expected a uint8 (3, H, W) image, got {image.dtype} "
                             f"{tuple(image.shape)}")
        h, w = int(image.shape[1]), int(image.shape[2])
        if min(h, w) != self.size:  # shorter side to size, aspect kept (antialiased like PIL)
            scale = self.size / min(h, w)
            h, w = max(self.size, round(h * scale)), max(self.size, round(w * scale))
            image = TF.resize(image, [h, w], antialias=True)
        top, left = self.crop_box(h, w)
        image = image[:, top:top + self.size, left:left + self.size]
        flipped = False
        if self.train and self.flip and not names_a_side(caption):
            flipped = bool(torch.rand((), generator=self.generator) < 0.5)
            if flipped:
                image = image.flip(-1)
        return to_signed_float(image.contiguous()), flipped

    def __repr__(self) -> str:
        return f"PaperTransform(size={self.size}, train={self.train}, flip={self.flip})"


__all__ = ["PaperTransform", "choose_caption", "mix", "names_a_side", "to_signed_float"]
