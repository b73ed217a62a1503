"""Image files to RGB tensors: torchvision.io where it can, PIL where it cannot.

``torchvision.io.decode_image`` (libjpeg-turbo / libpng, in C, without a PIL round trip) is
the fast path. PIL takes over for what it does not read or reads wrongly: CMYK / YCCK
JPEGs, palette and 16-bit images, TIFF, BMP. A truncated JPEG or PNG is refused (libjpeg
would otherwise fill the missing rows with grey and only warn).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor
from torchvision.io import ImageReadMode, decode_image

from lgvq_plugins.data.bad_samples import BadSampleError

# torchvision 0.29 deprecates its decoders in favour of TorchCodec (not a dependency here);
# they remain the fastest JPEG path available, so the notice is silenced, for them only.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)

#: image modes decoded without conversion (anything else is converted to RGB and counted)
RGB_MODES = ("RGB",)
# PIL refuses huge images as "decompression bombs"; real data sets hold none, a corrupt
# header may claim one: it is then reported as corrupt rather than allocating gigabytes.
_MAX_PIXELS = 20000 * 20000


@dataclass(frozen=True)
class ImageInfo:
    """What an image's header says: size and PIL mode (``"RGB"``, ``"L"``, ``"CMYK"``, ...)."""

    width: int
    height: int
    mode: str

    @property
    def needs_conversion(self) -> bool:
        return self.mode not in RGB_MODES


def read_header(path: Path, dataset: str, min_side: int = 1) -> ImageInfo:
    """Open ``path`` lazily (PIL reads only the header) and check it is an image of at least
    ``min_side`` pixels per side.

    Raises:
        BadSampleError: ``missing_image``, ``corrupt_image`` or ``tiny_image``, naming the file.
    """
    try:
        with Image.open(path) as im:
            width, height, mode = int(im.width), int(im.height), str(im.mode)
    except FileNotFoundError:
        raise BadSampleError(dataset, path, "missing_image") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise BadSampleError(dataset, path, "corrupt_image", f"{type(exc).__name__}: {exc}") from None
    if width * height > _MAX_PIXELS:
        raise BadSampleError(dataset, path, "corrupt_image", f"header claims {width}x{height} pixels")
    if min(width, height) < min_side:
        raise BadSampleError(dataset, path, "tiny_image", f"{width}x{height} < {min_side} pixels per side")
    return ImageInfo(width, height, mode)


def _truncated(data: bytes) -> bool:
    """A JPEG without its end-of-image marker or a PNG without its IEND chunk."""
    if data[:2] == b"\xff\xd8":
        return b"\xff\xd9" not in data[-64:]  # a few padding bytes may follow the marker
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return b"IEND" not in data[-32:]
    return False


def _decode_pil(data: bytes, path: Path, dataset: str) -> Tensor:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grey: keep the top 8 bits
                im = im.point(lambda v: v / 256).convert("L")
            rgb = im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        kind = "truncated_image" if "truncated" in str(exc).lower() else "corrupt_image"
        raise BadSampleError(dataset, path, kind, f"{type(exc).__name__}: {exc}") from None
    array = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
    return array.view(rgb.height, rgb.width, 3).permute(2, 0, 1).contiguous()


def _decode_reduced(data: bytes, path: Path, dataset: str, min_side: int) -> Tensor | None:
    """A JPEG decoded at 1/2, 1/4 or 1/8 scale inside libjpeg (DCT scaling, via PIL's
    ``draft``) when its shorter side stays >= ``min_side``; ``None`` when no reduction fits.
    A 1024² CelebA-HQ face for a 256² run decodes at 256² directly, ~10× less work than a
    full decode followed by a resize."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            full = im.size
            im.draft("RGB", (min_side, min_side))  # the largest reduction keeping both sides >= min_side
            if im.size == full:
                return None
            im.load()
            rgb = ImageOps.exif_transpose(im).convert("RGB")  # as torchvision's apply_exif_orientation
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        kind = "truncated_image" if "truncated" in str(exc).lower() else "corrupt_image"
        raise BadSampleError(dataset, path, kind, f"{type(exc).__name__}: {exc}") from None
    array = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
    return array.view(rgb.height, rgb.width, 3).permute(2, 0, 1).contiguous()


def decode_bytes(data: bytes, path: Path | str, dataset: str, mode: str | None = None,
                 min_side: int | None = None) -> Tensor:
    """Decode an encoded image to uint8 (3, H, W) RGB.

    Args:
        data: the file's bytes.
        path: named in errors.
        mode: the header's PIL mode when known; a mode torchvision mishandles goes to PIL.
        min_side: the shorter side the caller needs (its resize target); a JPEG at least
            twice as large is decoded at a reduced scale that still reaches it (the result
            is then smaller than the file's size: do not use it for pixel coordinates).

    Raises:
        BadSampleError: ``truncated_image`` or ``corrupt_image``, naming ``path``.
    """
    path = Path(path)
    if not data:
        raise BadSampleError(dataset, path, "corrupt_image", "the file is empty")
    if _truncated(data):
        raise BadSampleError(dataset, path, "truncated_image")
    if min_side and data[:2] == b"\xff\xd8":
        reduced = _decode_reduced(data, path, dataset, int(min_side))
        if reduced is not None:
            return reduced
    if mode in (None, "RGB", "L", "RGBA", "LA"):
        try:
            image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                                 mode=ImageReadMode.RGB, apply_exif_orientation=True)
            if image.dtype == torch.uint8 and image.shape[0] == 3:
                return image
        except (RuntimeError, ValueError):
            pass  # a format torchvision does not read (or reads badly): PIL decides
    return _decode_pil(data, path, dataset)


def load_rgb(path: Path, dataset: str, mode: str | None = None, min_side: int | None = None) -> Tensor:
    """Read and decode ``path`` to uint8 (3, H, W) RGB (see :func:`decode_bytes`)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise BadSampleError(dataset, path, "missing_image") from None
    except OSError as exc:
        raise BadSampleError(dataset, path, "corrupt_image", f"{type(exc).__name__}: {exc}") from None
    return decode_bytes(data, path, dataset, mode, min_side)


__all__ = ["RGB_MODES", "ImageInfo", "decode_bytes", "load_rgb", "read_header"]
