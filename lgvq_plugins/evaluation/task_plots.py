"""Figures of the downstream tasks' outputs for ``report.html``: generated samples beside
their conditioning and the real image, boxes drawn on images, thumbnails. PNG bytes
(matplotlib Agg / PIL), embedded by :mod:`lgvq_plugins.evaluation.task_views`.

    pairs = split_pairs(Path("eval/text_to_image/samples.png").read_bytes(), (32, 32))
    png = generation_figure([{"condition": "a red circle", "real": real, "generated": {"vqgan": fake}}],
                            condition="text")

Images here are (H, W, 3) uint8 arrays.
"""

from __future__ import annotations

import io
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lgvq_plugins.evaluation.plots import _png, _pyplot, _to_uint8

#: colours of the models' predicted boxes, in order (the true box is green)
BOX_COLOURS = ("#d62728", "#1f77b4", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2")


def to_uint8(image: Any) -> np.ndarray:
    """One (3, H, W) image in [-1, 1] (tensor or array) → (H, W, 3) uint8."""
    return _to_uint8(image[None] if getattr(image, "ndim", 0) == 3 else image)[0]


def split_pairs(png: bytes, image_hw: tuple[int, int] | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (real, generated) image pairs of a generation task's ``samples.png``.

    The file is torchvision's ``save_image(..., nrow=2, padding=1)`` grid: one sample per row,
    real image left, generated right, 1-pixel borders. ``image_hw`` is the images' size
    (default: square, read from the width).
    """
    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        arr = np.asarray(im.convert("RGB"))
    height, width = arr.shape[:2]
    w = (width - 1) // 2 - 1
    h = image_hw[0] if image_hw else w
    if image_hw and image_hw[1] != w or (height - 1) % (h + 1) or 2 * (w + 1) + 1 != width:
        raise ValueError(f"samples.png ({width}x{height}) is not a 2-column grid of {h}x{w} images with "
                         "1-pixel borders (torchvision save_image(nrow=2, padding=1))")
    rows = (height - 1) // (h + 1)
    return [(arr[1 + r * (h + 1): 1 + r * (h + 1) + h, 1: 1 + w],
             arr[1 + r * (h + 1): 1 + r * (h + 1) + h, w + 2: 2 * w + 2]) for r in range(rows)]


def thumbnail(image: np.ndarray, side: int = 64) -> bytes:
    """A small PNG of ``image``, enlarged with nearest-neighbour sampling to about ``side`` px."""
    from PIL import Image

    scale = max(1, side // max(image.shape[:2]))
    big = image.repeat(scale, axis=0).repeat(scale, axis=1)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(big)).save(buf, format="PNG")
    return buf.getvalue()


def _image_axis(ax: Any, image: np.ndarray, title: str | None = None) -> None:
    ax.imshow(image, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=8)


def generation_figure(rows: Sequence[Mapping[str, Any]], *, condition: str = "none") -> bytes:
    """One row per sample: its conditioning (``condition`` = ``"text"``: the caption;
    ``"semantic_map"``: the class map), the real image, then each model's generated image.

    ``rows[i]`` = ``{"condition": caption or (H, W) class map or None, "real": image,
    "generated": {label: image}}``; every row has the same labels.
    """
    plt = _pyplot()
    if not rows:
        raise ValueError("generation_figure: no samples")
    labels = list(rows[0]["generated"])
    shown = condition in ("text", "semantic_map")
    cols = int(shown) + 1 + len(labels)
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.45 * cols + (1.2 if condition == "text" else 0),
                                                       1.45 * len(rows)), squeeze=False,
                             gridspec_kw={"width_ratios": ([1.8] if condition == "text" else [1] * shown)
                                          + [1] * (cols - shown)})
    for r, row in enumerate(rows):
        axs = list(axes[r])
        if shown:
            ax = axs.pop(0)
            if condition == "text":
                ax.axis("off")
                ax.text(0.0, 0.5, textwrap.fill(str(row["condition"]), 26), fontsize=7, va="center", ha="left",
                        transform=ax.transAxes)
                if r == 0:
                    ax.set_title("caption", fontsize=8)
            else:
                ax.imshow(np.asarray(row["condition"]), cmap="tab10", vmin=0, vmax=9, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0:
                    ax.set_title("semantic map", fontsize=8)
        _image_axis(axs[0], row["real"], "real" if r == 0 else None)
        for ax, label in zip(axs[1:], labels):
            _image_axis(ax, row["generated"][label], label if r == 0 else None)
    fig.tight_layout()
    return _png(fig)


def _rect(rectangle: Any, box: Sequence[float], hw: tuple[int, int], colour: str, style: str) -> Any:
    """A matplotlib rectangle of ``box`` (x0, y0, x1, y1 in image units) on an (h, w) image."""
    h, w = hw
    x0, y0, x1, y1 = (float(v) for v in box)
    # pixel edges: imshow puts pixel centres at integers, so the image spans -0.5 .. w - 0.5
    return rectangle((x0 * w - 0.5, y0 * h - 0.5), (x1 - x0) * w, (y1 - y0) * h, fill=False,
                     edgecolor=colour, linewidth=1.6, linestyle=style)


def boxes_figure(panels: Sequence[Mapping[str, Any]], labels: Sequence[str], *, per_row: int = 4) -> bytes:
    """Images with the true box (green, solid) and each model's predicted box (dashed, one
    colour per label), the referring expression under each.

    ``panels[i]`` = ``{"image": (H, W, 3), "text": str, "truth": (x0, y0, x1, y1),
    "predicted": {label: box}}``; boxes in image-size units ([0, 1]).
    """
    plt = _pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle

    if not panels:
        raise ValueError("boxes_figure: no samples")
    cols = min(per_row, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(2.3 * cols, 2.6 * nrows + 0.4), squeeze=False)
    colours = {label: BOX_COLOURS[i % len(BOX_COLOURS)] for i, label in enumerate(labels)}
    for ax, panel in zip(axes.flat, panels):
        image = panel["image"]
        h, w = image.shape[:2]
        _image_axis(ax, image)
        ax.add_patch(_rect(Rectangle, panel["truth"], (h, w), "#2ca02c", "-"))
        for label, box in panel["predicted"].items():
            if box is not None:
                ax.add_patch(_rect(Rectangle, box, (h, w), colours[label], "--"))
        ax.set_xlim(-0.5, w - 0.5)
        ax.set_ylim(h - 0.5, -0.5)
        ax.set_xlabel(textwrap.fill(str(panel["text"]), 30), fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles = [Line2D([], [], color="#2ca02c", lw=1.6, label="true")] + \
        [Line2D([], [], color=colours[label], lw=1.6, ls="--", label=label) for label in labels]
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    return _png(fig)


__all__ = ["BOX_COLOURS", "boxes_figure", "generation_figure", "split_pairs", "thumbnail", "to_uint8"]
