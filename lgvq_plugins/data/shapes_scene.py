"""Scenes of the ``shapes`` data set: sampling a layout and rendering it.

A scene holds 1 to ``max_objects`` objects, each with a shape, a named colour, a size
class (small/large) and a position, on a dark, lightly tinted background. Objects never
overlap: their (square) extents are kept apart by a gap of a couple of pixels, so every
object's pixels are exactly its mask and the boxes and label maps are exact.

Rendering evaluates each shape's membership test on a coordinate grid of pixel centres
(numpy, one small window per object), then maps an object-id image through per-scene
lookup tables to the RGB image, the semantic (shape) map and the colour map. Nothing loops
over pixels.

Label ids (``semantic`` map): 0 background, ``1 + SHAPES.index(shape)`` for an object.
Colour map: 0 background, ``1 + COLOUR_NAMES.index(colour)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

#: Shape classes; semantic label of a shape is its index + 1 (0 is background).
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")

#: Named colours (RGB in [0, 1]). Hues are far apart (red 0°, orange ~30°, yellow ~57°,
#: green ~130°, cyan ~183°, blue ~228°, purple ~276°) and white is unsaturated, so a
#: colour name is recoverable from any rendered pixel even after the brightness jitter.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "orange": (1.00, 0.55, 0.05),
    "yellow": (0.95, 0.90, 0.10),
    "green": (0.10, 0.75, 0.20),
    "cyan": (0.10, 0.85, 0.90),
    "blue": (0.15, 0.30, 0.95),
    "purple": (0.60, 0.20, 0.85),
    "white": (0.95, 0.95, 0.95),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
_PALETTE = np.array([COLOURS[c] for c in COLOUR_NAMES], dtype=np.float32)  # (C, 3)

#: Size classes; index 1 is "large".
SIZES: tuple[str, ...] = ("small", "large")

# Half-extent of an object (centre to the edge of its square extent), as a fraction of
# the image side. The two ranges are far apart so "small"/"large" is never a judgement call.
_HALF_EXTENT = {0: (0.09, 0.12), 1: (0.17, 0.21)}
_BRIGHTNESS = (0.80, 1.00)  # per-object multiplicative jitter: keeps hue and saturation
_BACKGROUND_LEVEL = (0.08, 0.22)  # dark grey ...
_BACKGROUND_TINT = 0.03  # ... with a light per-channel tint
_CANDIDATES = 16  # positions tried at once per object when placing it
_ROUNDS = 8  # batches of candidates before an object is shrunk (then the scene restarts)
MAX_SIZE = 4096
_PIXEL_CENTRES = np.arange(MAX_SIZE + 8) + 0.5  # x (or y) of pixel centres (+ slack for windows)
MIN_SIZE = 32  # below this, small objects are too few pixels to tell the shapes apart


class Layout(NamedTuple):
    """A sampled scene before rendering: one entry per object (arrays of length N)."""

    shape: np.ndarray  # (N,) int64 index into SHAPES
    colour: np.ndarray  # (N,) int64 index into COLOUR_NAMES
    large: np.ndarray  # (N,) bool
    centre: np.ndarray  # (N, 2) float64 (x, y) in pixels, origin at the top-left corner
    half: np.ndarray  # (N,) float64 half-extent in pixels
    rgb: np.ndarray  # (N, 3) float32 rendered colour (palette colour × brightness)
    background: np.ndarray  # (3,) float32


class Rendered(NamedTuple):
    """Pixels and exact labels of a rendered layout."""

    image: np.ndarray  # (3, H, W) float32 in [0, 1] (or [-1, 1] when rendered signed)
    objects: np.ndarray  # (H, W) int64: 0 background, i + 1 for object i
    semantic: np.ndarray  # (H, W) int64: 0 background, 1 + shape index
    colour_map: np.ndarray  # (H, W) int64: 0 background, 1 + colour index
    boxes: np.ndarray  # (N, 4) float32 (x0, y0, x1, y1): tight; x1, y1 exclusive


@dataclass(frozen=True)
class SceneObject:
    """One object of a scene, as downstream code and tests see it."""

    shape: str
    colour: str
    size: str  # "small" | "large"
    centre: tuple[float, float]  # (x, y) in pixels
    box: tuple[float, float, float, float]  # (x0, y0, x1, y1) in pixels, x1/y1 exclusive
    half_extent: float  # pixels from the centre to the edge of the object's square extent

    @property
    def semantic_id(self) -> int:
        """The object's label in the ``semantic`` map."""
        return 1 + SHAPES.index(self.shape)

    @property
    def colour_id(self) -> int:
        """The object's label in the ``colour_map``."""
        return 1 + COLOUR_NAMES.index(self.colour)


@dataclass(frozen=True)
class Scene:
    """A structured scene: its objects (in the order they were sampled) and background."""

    objects: tuple[SceneObject, ...]
    background: tuple[float, float, float]
    size: int


def check_size(size: int) -> None:
    """Raise a clear error for image sizes the renderer cannot draw legibly."""
    if not isinstance(size, (int, np.integer)) or not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"shapes: size={size!r} is out of range; use an integer from {MIN_SIZE} "
                         f"(so small objects still show their shape) to {MAX_SIZE}; "
                         "64 is the default")


def _place(rng: np.random.Generator, half: np.ndarray, size: int, gap: float) -> np.ndarray | None:
    """Centres (N, 2) for objects of the given half-extents, no two extents closer than
    ``gap``; objects are placed one at a time from batches of random candidates. Returns
    None when an object finds no room (the caller shrinks it or restarts)."""
    centres = np.empty((len(half), 2))
    for i, h in enumerate(half):
        lo, hi = h + 1.0, size - h - 1.0  # keep a 1 px border round every object
        for _ in range(_ROUNDS):
            cand = lo + rng.random((_CANDIDATES, 2)) * (hi - lo)  # (K, 2)
            if i == 0:
                centres[0] = cand[0]
                break
            # Two square extents are disjoint when they are apart along x or along y.
            need = half[:i] + h + gap  # (i,)
            apart = np.abs(cand[:, None, :] - centres[None, :i, :]) >= need[None, :, None]
            ok = apart.any(axis=2).all(axis=1)  # (K,)
            if ok.any():
                centres[i] = cand[ok.argmax()]
                break
        else:
            return None
    return centres


def _make_distinct(rng: np.random.Generator, shape: np.ndarray, colour: np.ndarray,
                   large: np.ndarray) -> None:
    """Recolour objects (in place) until no two share size, colour *and* shape, so each
    object's full description is unique and every object can be referred to."""
    for i in range(1, len(shape)):
        while any(shape[j] == shape[i] and colour[j] == colour[i] and large[j] == large[i]
                  for j in range(i)):
            colour[i] = rng.integers(0, len(COLOUR_NAMES))


def sample_layout(rng: np.random.Generator, size: int, min_objects: int, max_objects: int) -> Layout:
    """Draw a layout from ``rng`` (every draw comes from it, so a seeded rng gives the same
    layout every time)."""
    n = int(rng.integers(min_objects, max_objects + 1))
    shape = rng.integers(0, len(SHAPES), n)
    colour = rng.integers(0, len(COLOUR_NAMES), n)
    large = rng.random(n) < 0.5
    fraction = rng.random(n)
    brightness = _BRIGHTNESS[0] + rng.random(n) * (_BRIGHTNESS[1] - _BRIGHTNESS[0])
    bg = (_BACKGROUND_LEVEL[0] + rng.random() * (_BACKGROUND_LEVEL[1] - _BACKGROUND_LEVEL[0])
          + (rng.random(3) * 2.0 - 1.0) * _BACKGROUND_TINT)
    gap = max(1.0, size / 32.0)

    for _ in range(2 * n + 1):
        lo = np.where(large, _HALF_EXTENT[1][0], _HALF_EXTENT[0][0])
        hi = np.where(large, _HALF_EXTENT[1][1], _HALF_EXTENT[0][1])
        half = (lo + fraction * (hi - lo)) * size
        centres = _place(rng, half, size, gap)
        if centres is not None:
            break
        # Crowded: shrink one large object and try again, rather than loop forever.
        if large.any():
            large[np.flatnonzero(large)[-1]] = False
    else:
        raise RuntimeError(f"shapes: cannot place {n} objects without overlap on a {size}x{size} "
                           "image; lower max_objects or raise size")

    _make_distinct(rng, shape, colour, large)
    rgb = (_PALETTE[colour] * brightness[:, None]).astype(np.float32)
    return Layout(shape, colour, large, centres, half, rgb, bg.astype(np.float32))


def _inside(shape: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Membership test in object coordinates (u, v) = (x - cx, y - cy) / half_extent; y grows
    downwards. Each shape fits the unit square [-1, 1]² and contains (0, 0)."""
    au, av = np.abs(u), np.abs(v)
    if shape == 0:  # circle
        return u * u + v * v <= 1.0
    if shape == 1:  # square, a little inset so its area is close to the circle's
        return np.maximum(au, av) <= 0.85
    if shape == 2:  # triangle, apex up, base at v = 0.75
        return (v <= 0.75) & (au * 1.75 <= v + 1.0)
    if shape == 3:  # diamond
        return au + av <= 1.0
    if shape == 4:  # cross: two bars of half-width 0.3
        return ((au <= 0.3) & (av <= 0.95)) | ((av <= 0.3) & (au <= 0.95))
    raise ValueError(f"unknown shape index {shape}")


def rasterise(shape: int, cx: float, cy: float, half: float, size: int
              ) -> tuple[int, int, np.ndarray, tuple[int, int, int, int]]:
    """One object's mask: ``(x0, y0, mask, box)`` with ``mask`` (h, w) bool covering the
    window whose top-left pixel is (x0, y0), and ``box`` the tight (x0, y0, x1, y1) of its
    pixels (x1, y1 exclusive)."""
    # Only the object's square extent (plus a pixel) can hold its pixels.
    x0, x1 = max(int(cx - half), 0), min(math.ceil(cx + half) + 1, size)
    y0, y1 = max(int(cy - half), 0), min(math.ceil(cy + half) + 1, size)
    u = ((_PIXEL_CENTRES[x0:x1] - cx) / half)[None, :]  # (1, w)
    v = ((_PIXEL_CENTRES[y0:y1] - cy) / half)[:, None]  # (h, 1)
    mask = _inside(shape, u, v)  # (h, w) by broadcasting
    cols, rows = np.flatnonzero(mask.any(axis=0)), np.flatnonzero(mask.any(axis=1))
    box = (x0 + int(cols[0]), y0 + int(rows[0]), x0 + int(cols[-1]) + 1, y0 + int(rows[-1]) + 1)
    return x0, y0, mask, box


def lone_object_boxes(shape: int, centres: np.ndarray, half: float, size: int) -> np.ndarray:
    """Tight pixel boxes (K, 4) int of one object drawn at each of K candidate centres,
    all at once. The pixel coordinates are computed exactly as :func:`rasterise` computes
    them, so each box equals the one the render will have (bit for bit, no rounding drift)."""
    width = int(2 * half) + 3  # covers int(c - h) .. ceil(c + h) for any fractional c
    origin = (centres - half).astype(np.int64)  # (K, 2) window top-left (x0, y0); c - h > 0
    grid = origin[:, :, None] + np.arange(width)  # (K, 2, width) pixel indices
    coords = (_PIXEL_CENTRES[grid] - centres[:, :, None]) / half  # (K, 2, width)
    mask = _inside(shape, coords[:, 0, None, :], coords[:, 1, :, None])  # (K, width, width)
    cols, rows = mask.any(axis=1), mask.any(axis=2)  # (K, width) each
    first_col, first_row = cols.argmax(axis=1), rows.argmax(axis=1)
    last_col = width - 1 - cols[:, ::-1].argmax(axis=1)
    last_row = width - 1 - rows[:, ::-1].argmax(axis=1)
    return np.stack([origin[:, 0] + first_col, origin[:, 1] + first_row,
                     origin[:, 0] + last_col + 1, origin[:, 1] + last_row + 1], axis=1)


def random_centres(rng: np.random.Generator, half: float, size: int, count: int) -> np.ndarray:
    """``count`` uniform centres (count, 2) keeping an object of this half-extent 1 px
    inside the image (the same rule as placement)."""
    return half + 1.0 + rng.random((count, 2)) * (size - 2.0 * half - 2.0)


def render(layout: Layout, size: int, *, signed: bool = False) -> Rendered:
    """Rasterise ``layout`` at ``size``×``size``: object-id image, then lookup tables.
    ``signed=True`` gives the image in [-1, 1] instead of [0, 1] (scaled in the palette,
    so it costs nothing per pixel)."""
    n = len(layout.shape)
    objects = np.zeros((size, size), dtype=np.int64)
    boxes = np.empty((n, 4), dtype=np.float32)
    centres, halves = layout.centre.tolist(), layout.half.tolist()
    for i in range(n):  # a loop over the (≤ a few) objects; each mask is one array expression
        (cx, cy), h = centres[i], halves[i]
        x0, y0, mask, boxes[i] = rasterise(int(layout.shape[i]), cx, cy, h, size)
        objects[y0:y0 + mask.shape[0], x0:x0 + mask.shape[1]][mask] = i + 1

    palette = np.empty((3, n + 1), dtype=np.float32)  # column 0 is the background
    palette[:, 0] = layout.background
    palette[:, 1:] = layout.rgb.T
    if signed:
        palette = palette * 2.0 - 1.0
    image = np.take(palette, objects, axis=1)  # (3, H, W); np.take is ~3x faster than [:, objects]
    semantic = np.take(np.concatenate(([0], layout.shape + 1)), objects)
    colour_map = np.take(np.concatenate(([0], layout.colour + 1)), objects)
    return Rendered(image, objects, semantic, colour_map, boxes)


def to_scene(layout: Layout, boxes: np.ndarray, size: int) -> Scene:
    """The structured (public) view of a layout and its rendered boxes."""
    objects = tuple(
        SceneObject(
            shape=SHAPES[int(layout.shape[i])],
            colour=COLOUR_NAMES[int(layout.colour[i])],
            size=SIZES[int(layout.large[i])],
            centre=(float(layout.centre[i, 0]), float(layout.centre[i, 1])),
            box=tuple(float(b) for b in boxes[i]),
            half_extent=float(layout.half[i]),
        )
        for i in range(len(layout.shape))
    )
    return Scene(objects, tuple(float(c) for c in layout.background), size)
