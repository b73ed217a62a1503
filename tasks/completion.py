"""``completion``: the top half of an image's codes given, the rest sampled; FID.

The prior is the unconditional one (same protocol as ``unconditional``, see
:class:`~lgvq_plugins.tasks.unconditional.GenerativeTask`): raster order puts the top
half's ``⌊h/2⌋·w`` codes first, so completing an image is continuing its sequence. FID
compares the completed images with the originals.
"""

from __future__ import annotations

from lgvq_plugins.tasks.unconditional import GenerativeTask
from torch import Tensor


class Completion(GenerativeTask):
    """Image completion from the top half's codes (gin: ``completion.*``).

    Args:
        given_rows: code rows given (None: the top half, ``h // 2``); other settings as
            :class:`~lgvq_plugins.tasks.unconditional.GenerativeTask`.
    """

    conditioning = "top_half"

    def __init__(self, *args, given_rows: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.given_rows = given_rows

    def given(self, codes: Tensor, grid: tuple[int, int]) -> Tensor:
        h, w = grid
        rows = self.given_rows if self.given_rows is not None else h // 2
        return codes[:, : rows * w]


__all__ = ["Completion"]
